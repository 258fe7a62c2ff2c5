//! One synthetic lung nodule: its size, form and density drawn from the distributions in
//! docs/nodules.md, and an inside test at any point (mm) that the renderer samples.
//!
//! The body is a sphere whose radius varies with direction by a sum of a few random plane waves
//! on the unit sphere (a cheap stand-in for low-order spherical harmonics), plus, for lobulated
//! nodules, 2-4 overlapping spheres; spiculated nodules add thin tapering spikes. The body is
//! scaled so that its volume is that of a sphere of the drawn diameter, so the diameter reported
//! is the equivalent-sphere diameter that the tests measure back from the mask.

use rand::Rng;
use serde::Serialize;

/// Fleischner's density categories (MacMahon et al., Radiology 2017).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Density {
    Solid,
    PartSolid,
    GroundGlass,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Form {
    Round,
    Lobulated,
    Spiculated,
}

/// The attenuation ranges the nodules are drawn from (HU), checked by the tests.
pub const SOLID_HU: [f64; 2] = [-100.0, 100.0];
pub const GROUND_GLASS_HU: [f64; 2] = [-750.0, -300.0];
/// Equivalent-sphere diameters drawn (mm): log-normal, median and log-sd below, kept to this
/// range so that the voxelised masks measure within 3-30 mm.
pub const DIAMETER_MM: [f64; 2] = [3.5, 28.0];
const DIAMETER_MEDIAN_MM: f64 = 7.0;
const DIAMETER_LOG_SD: f64 = 0.5;
/// Equivalent-sphere diameters of masses (lesions over 3 cm), uniform in this range (mm): up to
/// what a 64 mm window at 1 mm holds with the lobes and waves of the body around it.
pub const MASS_DIAMETER_MM: [f64; 2] = [32.0, 50.0];

/// A nodule (LIDC's 3-30 mm), or a mass: a lesion over 3 cm (Fleischner glossary), drawn on
/// request (`--masses`) because LIDC stops at 30 mm and real lesions do not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Nodule,
    Mass,
}

/// What `occupancy` returns: nothing, the ground-glass part, or solid tissue.
pub const OUTSIDE: u8 = 0;
pub const GLASS: u8 = 1;
pub const SOLID: u8 = 2;

#[derive(Clone, Debug, Serialize)]
pub struct Nodule {
    pub kind: Kind,
    pub diameter_mm: f64,
    pub form: Form,
    pub density: Density,
    /// Attenuation of the solid part (solid nodules, part-solid cores), HU.
    pub hu_solid: f64,
    /// Attenuation of the ground-glass part, HU (unused for solid nodules).
    pub hu_glass: f64,
    /// Core size relative to the body (part-solid only), else 0.
    pub core_fraction: f64,
    /// Body scale: mm per unit of the unit-shape below.
    #[serde(skip)]
    scale: f64,
    #[serde(skip)]
    waves: Vec<([f64; 3], f64, f64, f64)>,
    #[serde(skip)]
    lobes: Vec<([f64; 3], f64)>,
    /// Direction, start and end distance from the centre (mm) and base radius (mm).
    #[serde(skip)]
    spikes: Vec<([f64; 3], f64, f64, f64)>,
}

fn unit(rng: &mut impl Rng) -> [f64; 3] {
    loop {
        let v: [f64; 3] = std::array::from_fn(|_| rng.random_range(-1.0..1.0));
        let n = norm(v);
        if n > 0.1 && n <= 1.0 {
            return v.map(|c| c / n);
        }
    }
}

fn norm(v: [f64; 3]) -> f64 {
    (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt()
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// A standard normal draw (Box-Muller).
pub fn normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

impl Nodule {
    /// Draws a nodule or a mass (module doc; proportions in docs/nodules.md). Masses are solid;
    /// their forms are drawn as the nodules' are.
    pub fn draw(rng: &mut impl Rng, kind: Kind) -> Nodule {
        let diameter_mm = match kind {
            Kind::Nodule => loop {
                let d = (DIAMETER_MEDIAN_MM.ln() + DIAMETER_LOG_SD * normal(rng)).exp();
                if (DIAMETER_MM[0]..=DIAMETER_MM[1]).contains(&d) {
                    break d;
                }
            },
            Kind::Mass => rng.random_range(MASS_DIAMETER_MM[0]..=MASS_DIAMETER_MM[1]),
        };
        let density = match rng.random_range(0.0..1.0) {
            _ if kind == Kind::Mass => Density::Solid,
            p if p < 0.75 => Density::Solid,
            p if p < 0.90 => Density::PartSolid,
            _ => Density::GroundGlass,
        };
        let form = match rng.random_range(0.0..1.0) {
            p if p < 0.40 => Form::Round,
            p if p < 0.75 => Form::Lobulated,
            // Spicules are drawn on solid nodules only.
            _ if density == Density::Solid => Form::Spiculated,
            _ => Form::Lobulated,
        };
        let amp = if form == Form::Round { 0.03 } else { 0.08 };
        let waves = (0..4)
            .map(|_| (unit(rng), rng.random_range(1.5..3.5), rng.random_range(0.0..std::f64::consts::TAU), amp))
            .collect();
        let lobes = if form == Form::Lobulated {
            (0..rng.random_range(2..=4))
                .map(|_| (unit(rng).map(|c| c * rng.random_range(0.4..0.7)), rng.random_range(0.4..0.7)))
                .collect()
        } else {
            vec![]
        };
        let mut n = Nodule {
            kind,
            diameter_mm,
            form,
            density,
            hu_solid: rng.random_range(SOLID_HU[0]..SOLID_HU[1]),
            hu_glass: rng.random_range(GROUND_GLASS_HU[0]..GROUND_GLASS_HU[1]),
            core_fraction: if density == Density::PartSolid { rng.random_range(0.3..0.6) } else { 0.0 },
            scale: 1.0,
            waves,
            lobes,
            spikes: vec![],
        };
        n.scale = diameter_mm / 2.0 / (3.0 * n.unit_volume() / (4.0 * std::f64::consts::PI)).cbrt();
        if form == Form::Spiculated {
            let r = diameter_mm / 2.0;
            n.spikes = (0..rng.random_range(6..=14))
                .map(|_| {
                    let u = unit(rng);
                    let start = 0.5 * r;
                    let end = n.body_radius(u) * n.scale + rng.random_range(0.5..1.2) * r.min(8.0);
                    (u, start, end, rng.random_range(0.5..1.0))
                })
                .collect();
        }
        n
    }

    /// The unit body's radius in direction `u`.
    fn body_radius(&self, u: [f64; 3]) -> f64 {
        1.0 + self.waves.iter().map(|&(d, f, ph, a)| a * (f * dot(d, u) + ph).cos()).sum::<f64>()
    }

    fn in_unit_body(&self, p: [f64; 3]) -> bool {
        let r = norm(p);
        if r == 0.0 || r <= self.body_radius(p.map(|c| c / r)) {
            return true;
        }
        self.lobes.iter().any(|&(c, rl)| norm([p[0] - c[0], p[1] - c[1], p[2] - c[2]]) <= rl)
    }

    /// Monte-Carlo-free volume of the unit body: counted on a 0.04 grid.
    fn unit_volume(&self) -> f64 {
        const H: f64 = 0.04;
        let n = (2.0 / H) as i32;
        let mut count = 0usize;
        for i in -n..n {
            for j in -n..n {
                for k in -n..n {
                    let p = [i, j, k].map(|v| (v as f64 + 0.5) * H);
                    count += self.in_unit_body(p) as usize;
                }
            }
        }
        count as f64 * H * H * H
    }

    /// The largest distance (mm) from the centre that any part reaches.
    pub fn extent_mm(&self) -> f64 {
        let waves: f64 = 1.0 + self.waves.iter().map(|w| w.3.abs()).sum::<f64>();
        let lobes = self.lobes.iter().map(|&(c, r)| norm(c) + r).fold(0.0, f64::max);
        let spikes = self.spikes.iter().map(|s| s.2).fold(0.0, f64::max);
        (waves.max(lobes) * self.scale).max(spikes)
    }

    /// What lies at `p` (mm from the centre): [`OUTSIDE`], [`GLASS`] or [`SOLID`].
    pub fn occupancy(&self, p: [f64; 3]) -> u8 {
        let u = p.map(|c| c / self.scale);
        if self.in_unit_body(u) {
            let core = self.core_fraction;
            return match self.density {
                Density::Solid => SOLID,
                Density::GroundGlass => GLASS,
                Density::PartSolid if self.in_unit_body(u.map(|c| c / core)) => SOLID,
                Density::PartSolid => GLASS,
            };
        }
        let on_spike = self.spikes.iter().any(|&(d, start, end, base)| {
            let t = dot(p, d);
            if t < start || t > end {
                return false;
            }
            let off = [p[0] - t * d[0], p[1] - t * d[1], p[2] - t * d[2]];
            norm(off) <= base * (end - t) / (end - start)
        });
        if on_spike { SOLID } else { OUTSIDE }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// The body's volume is the drawn diameter's sphere's: counted on a fine grid, the
    /// equivalent diameter is within 3% for every form, nodules and masses; masses are solid
    /// and in their size range.
    #[test]
    fn volume_matches_the_drawn_diameter() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for kind in std::iter::repeat_n(Kind::Nodule, 12).chain(std::iter::repeat_n(Kind::Mass, 6)) {
            let n = Nodule { spikes: vec![], ..Nodule::draw(&mut rng, kind) };
            let range = if kind == Kind::Mass { MASS_DIAMETER_MM } else { DIAMETER_MM };
            assert!((range[0]..=range[1]).contains(&n.diameter_mm), "{kind:?} of {} mm", n.diameter_mm);
            assert!(kind == Kind::Nodule || n.density == Density::Solid, "a {:?} mass", n.density);
            let h = n.diameter_mm / 40.0;
            let e = (n.extent_mm() / h).ceil() as i32;
            let mut count = 0usize;
            for i in -e..=e {
                for j in -e..=e {
                    for k in -e..=e {
                        count += (n.occupancy([i, j, k].map(|v| v as f64 * h)) != OUTSIDE) as usize;
                    }
                }
            }
            let d = (6.0 * count as f64 * h.powi(3) / std::f64::consts::PI).cbrt();
            assert!((d / n.diameter_mm - 1.0).abs() < 0.03, "{:?}: {d} vs {}", n.form, n.diameter_mm);
        }
    }

    /// A part-solid nodule is solid at its centre and ground glass near its rim.
    #[test]
    fn part_solid_has_a_solid_core() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let n = std::iter::repeat_with(|| Nodule::draw(&mut rng, Kind::Nodule))
            .find(|n| n.density == Density::PartSolid)
            .unwrap();
        assert_eq!(n.occupancy([0.0; 3]), SOLID);
        let rim = n.diameter_mm / 2.0 * 0.8;
        let glass = (0..50)
            .filter(|i| n.occupancy([rim * (*i as f64 * 0.3).cos(), rim * (*i as f64 * 0.3).sin(), 0.0]) == GLASS);
        assert!(glass.count() > 10);
    }
}
