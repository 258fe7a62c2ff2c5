//! What the kernels' tests share: the convolution by its definition, the pseudo-random inputs
//! they compare on, and the comparison. Built for tests only.

use super::cpu::{self, Geom};

/// Direct definition of the convolution, for checking.
pub(super) fn naive(g: &Geom, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    let [sd, sh, sw] = g.sp;
    let [kd, kh, kw] = g.k;
    let mut y = vec![0.0; g.n * g.c_out * g.pixels()];
    for n in 0..g.n {
        for o in 0..g.c_out {
            for z in 0..sd {
                for r in 0..sh {
                    for c in 0..sw {
                        let mut acc = b[o] as f64;
                        for i in 0..g.c_in {
                            for a in 0..kd {
                                for bb in 0..kh {
                                    for cc in 0..kw {
                                        let (zz, rr, ccc) = (
                                            z as isize + a as isize - (kd / 2) as isize,
                                            r as isize + bb as isize - (kh / 2) as isize,
                                            c as isize + cc as isize - (kw / 2) as isize,
                                        );
                                        if zz < 0
                                            || rr < 0
                                            || ccc < 0
                                            || zz >= sd as isize
                                            || rr >= sh as isize
                                            || ccc >= sw as isize
                                        {
                                            continue;
                                        }
                                        let xi = (((n * g.c_in + i) * sd + zz as usize) * sh + rr as usize) * sw
                                            + ccc as usize;
                                        let wi = (((o * g.c_in + i) * kd + a) * kh + bb) * kw + cc;
                                        acc += x[xi] as f64 * w[wi] as f64;
                                    }
                                }
                            }
                        }
                        y[(((n * g.c_out + o) * sd + z) * sh + r) * sw + c] = acc as f32;
                    }
                }
            }
        }
    }
    y
}

pub(super) fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub(super) fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "element {i}: {x} vs {y}");
    }
}

/// Fails the calling test unless the CPU runs AVX-512F: the kernel it checks runs nowhere else,
/// and a test that passed without running it would prove nothing.
#[track_caller]
pub(super) fn require_avx512() {
    assert!(
        cpu::avx512(),
        "this test needs a CPU with AVX-512F, which the kernel it checks is written for \
         (on another CPU leave it out by name: --skip direct::tests --skip winograd::tests --skip winograd3d_tests \
         --skip kernel::tests::conv_relu_fused_equals_its_parts)"
    );
}
