//! Times resampling a CT-sized float volume (512 x 512 x 100 at 0.7 x 0.7 x 2.5 mm to 1 x 1 x 2.5 mm)
//! and its label map, as in docs/resampling.md: `cargo run --release --example resample_speed`.

use std::time::Instant;

/// Seconds of CPU this process has used (all threads): on a shared machine wall time says
/// more about the neighbours than about this code.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn cpu_s() -> f64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into `t`, which lives for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn cpu_s() -> f64 {
    f64::NAN
}

/// Runs `f`, printing its wall and CPU seconds.
fn timed<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let (t, c) = (Instant::now(), cpu_s());
    let out = f()?;
    println!("  {what}: {:.3} s wall, {:.3} s CPU", t.elapsed().as_secs_f64(), cpu_s() - c);
    Ok(out)
}

use unetpp::data::volume::resample::{Kind, Plan, resample, resample_labels};

fn main() -> anyhow::Result<()> {
    let shape = [100, 512, 512];
    let n: usize = shape.iter().product();
    let image: Vec<f32> = (0..n).map(|i| ((i % 512) as f32 * 0.05).sin() * 500.0 + (i / 512 % 512) as f32).collect();
    let labels: Vec<u8> = (0..n).map(|i| ((i % 512 / 128 + i / 512 % 512 / 256) % 3) as u8).collect();
    let plan = Plan::to_spacing(shape, [2.5, 0.7, 0.7], [2.5, 1.0, 1.0], "ct")?;
    println!(
        "{:?} -> {:?}, separate axis {:?}, {} threads",
        plan.from,
        plan.to,
        plan.separate,
        rayon::current_num_threads()
    );
    for round in 0..3 {
        println!("round {round}");
        let out = timed("image, cubic", || resample(&image, 1, &plan, Kind::Image))?;
        timed("labels, 3 classes", || resample_labels(&labels, &plan))?;
        timed("back, linear", || resample(&out, 1, &plan.inverse(), Kind::Probabilities))?;
    }
    Ok(())
}
