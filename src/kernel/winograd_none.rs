//! Winograd off x86-64: the kernel is AVX-512 code, so here it never applies (`applies` is
//! false and `conv` never takes the path), and these keep `conv` portable.

use super::cpu::Geom;
use std::mem::MaybeUninit;

const WHY: &str = "Winograd needs x86-64 AVX-512 (`applies` is false here)";
pub struct Weights;
pub fn applies(_: &Geom) -> bool {
    false
}
pub fn prepare(_: &Geom, _: &[f32]) -> Weights {
    unreachable!("{WHY}")
}
pub fn prepare_with(_: &Geom, _: impl Fn(usize, usize, usize) -> f32 + Sync) -> Weights {
    unreachable!("{WHY}")
}
pub fn prepare_tiled(_: &Geom, _: usize, _: impl Fn(usize, usize, usize) -> f32 + Sync) -> Weights {
    unreachable!("{WHY}")
}
pub fn tile_side(_: &Geom) -> usize {
    2
}
pub enum Epilogue<'a> {
    Store,
    Pool(&'a mut [MaybeUninit<f32>]),
    Head { w: &'a [f32], b: &'a [f32], out: &'a mut [MaybeUninit<f32>] },
}
pub fn forward(
    _: &Geom,
    _: (&[&[f32]], bool),
    _: &Weights,
    _: &[f32],
    _: bool,
    _: &mut [&mut [MaybeUninit<f32>]],
    _: Epilogue,
) {
    unreachable!("{WHY}")
}
pub fn backward_w(_: &Geom, _: &[&[f32]], _: &[f32]) -> Vec<f32> {
    unreachable!("{WHY}")
}
