//! Every normalisation means the same on every format (intensities in the file's own units), an
//! imported PyTorch model gives PyTorch's probabilities on image files through the CLI, labels are
//! read in the file's own values, and grey float TIFFs are read.
mod common;
use common::*;

use std::path::{Path, PathBuf};

use unetpp::data::io::{read_input, read_mask, read_raw};
use unetpp::data::{DataConfig, Normalize};

fn torch(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/torch").join(name)
}

fn grey8(path: &Path, w: u32, h: u32, v: Vec<u8>) {
    image::GrayImage::from_raw(w, h, v).unwrap().save(path).unwrap();
}

fn grey16(path: &Path, w: u32, h: u32, v: Vec<u16>) {
    image::ImageBuffer::<image::Luma<u16>, _>::from_raw(w, h, v).unwrap().save(path).unwrap();
}

fn float_tiff(path: &Path, w: u32, h: u32, v: &[f32]) {
    let file = std::fs::File::create(path).unwrap();
    let mut enc = tiff::encoder::TiffEncoder::new(file).unwrap();
    enc.write_image::<tiff::encoder::colortype::Gray32Float>(w, h, v).unwrap();
}

fn nifti<T: nifti::DataElement + bytemuck::Pod>(path: &Path, v: Vec<T>) {
    let arr = ndarray::Array3::from_shape_vec((v.len(), 1, 1), v).unwrap();
    nifti::writer::WriterOptions::new(path).write_nifti(&arr).unwrap();
}

fn input(path: &Path, channels: usize, normalize: &str) -> Vec<f32> {
    let cfg = DataConfig::new(channels, 1, normalize.parse().unwrap());
    read_input(path, &cfg).unwrap().0
}

fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (a, b) in got.iter().zip(want) {
        assert!((a - b).abs() < 1e-5, "{what}: got {got:?}, want {want:?}");
    }
}

/// `unetpp import` of PyTorch NestedUNet checkpoints, then `unetpp predict --probabilities` on
/// image files (8-bit RGB and grey PNG, 16-bit TIFF and PNG, float32 TIFF), against PyTorch fed
/// the same files the way its users do (albumentations' `Normalize()` formula for `imagenet`;
/// references written by scripts/torch_refs.py). Equal to the PNG's precision: the probability
/// PNG holds round(255 p), the references are float16.
#[test]
fn imported_models_give_pytorchs_probabilities_on_image_files() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(torch("scaling/probabilities.safetensors")).unwrap();
    let refs = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut checked = 0;
    for (folder, model, normalize) in [
        ("imagenet", "scaling/imagenet_model.pth", "imagenet"),
        ("window", "scaling/window_model.pth", "window:1000:40000"),
    ] {
        let ck = tmp.path().join(format!("{folder}.unetpp"));
        ok_text(&["import", "--from", s(&torch(model)), "--out", s(&ck), "--normalize", normalize]);
        let out = tmp.path().join(folder);
        let inputs = torch("scaling").join(folder);
        ok_text(&[
            "predict",
            "--checkpoint",
            s(&ck),
            "--input",
            s(&inputs),
            "--out",
            s(&out),
            "--probabilities",
            "png",
        ]);
        for entry in std::fs::read_dir(&inputs).unwrap() {
            let stem = unetpp::data::stem(&entry.unwrap().path());
            let mut c = 0;
            while let Ok(view) = refs.tensor(&format!("{stem}_prob{c}")) {
                let want: Vec<f32> =
                    view.data().chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
                let mean = want.iter().sum::<f32>() / want.len() as f32;
                let var = want.iter().map(|p| (p - mean).powi(2)).sum::<f32>() / want.len() as f32;
                assert!(var.sqrt() > 0.01, "{stem}_prob{c}: the reference hardly varies");
                let png = out.join(format!("{stem}_prob{c}.png"));
                let got = image::open(&png).unwrap().to_luma8().into_raw();
                assert_eq!(got.len(), want.len(), "{stem}_prob{c}");
                let worst = got.iter().zip(&want).map(|(&g, &p)| (g as f32 / 255.0 - p).abs()).fold(0f32, f32::max);
                eprintln!("{folder}/{stem} class {c}: max |png - pytorch| = {worst:.5} ({:.2}/255)", worst * 255.0);
                assert!(worst <= 0.5 / 255.0 + 5e-4, "{stem}_prob{c}: max abs difference {worst} from PyTorch");
                c += 1;
                checked += 1;
            }
            assert!(c > 0, "no reference for {stem}");
        }
    }
    assert_eq!(checked, 3 + 2 * 3, "probability maps compared");
}

/// `imagenet` divides by the sample type's full scale (albumentations' `max_pixel_value`): 255
/// for 8-bit, 65535 for 16-bit even when no value exceeds 255, 1 for float data.
#[test]
fn imagenet_divides_by_the_files_bit_depth() {
    let tmp = tempfile::tempdir().unwrap();
    let want = |x: f32, c: usize| (x - [0.485, 0.456, 0.406][c]) / [0.229, 0.224, 0.225][c];
    let rgb = tmp.path().join("rgb.png");
    image::RgbImage::from_raw(2, 1, vec![0, 128, 255, 51, 204, 10]).unwrap().save(&rgb).unwrap();
    let expect: Vec<f32> = [[0.0, 51.0], [128.0, 204.0], [255.0, 10.0]]
        .iter()
        .enumerate()
        .flat_map(|(c, px)| px.map(|v| want(v / 255.0, c)))
        .collect();
    close(&input(&rgb, 3, "imagenet"), &expect, "8-bit RGB");

    let rgb16 = tmp.path().join("rgb16.png");
    image::ImageBuffer::<image::Rgb<u16>, _>::from_raw(1, 1, vec![0u16, 32768, 65535]).unwrap().save(&rgb16).unwrap();
    let expect = [want(0.0, 0), want(32768.0 / 65535.0, 1), want(1.0, 2)];
    close(&input(&rgb16, 3, "imagenet"), &expect, "16-bit RGB");

    let dark = tmp.path().join("dark16.png");
    grey16(&dark, 2, 1, vec![0, 255]);
    let grey = |x: f32| (x - 0.449) / 0.226;
    close(&input(&dark, 1, "imagenet"), &[grey(0.0), grey(255.0 / 65535.0)], "dark 16-bit grey");

    let g8 = tmp.path().join("grey8.png");
    grey8(&g8, 2, 1, vec![0, 255]);
    let expect: Vec<f32> = (0..3).flat_map(|c| [want(0.0, c), want(1.0, c)]).collect();
    close(&input(&g8, 3, "imagenet"), &expect, "8-bit grey to an RGB model");

    let vol = tmp.path().join("u8.nii.gz");
    nifti(&vol, vec![0u8, 255]);
    close(&input(&vol, 1, "imagenet"), &[grey(0.0), grey(1.0)], "uint8 NIfTI");
    let vol = tmp.path().join("f32.nii.gz");
    nifti(&vol, vec![0f32, 0.5]);
    close(&input(&vol, 1, "imagenet"), &[grey(0.0), grey(0.5)], "float NIfTI");
}

/// `window:LOW:HIGH` is in the file's units on 8- and 16-bit PNG, JPEG and float TIFF, as on NIfTI.
#[test]
fn window_is_in_the_files_units_on_every_format() {
    let tmp = tempfile::tempdir().unwrap();
    let p8 = tmp.path().join("a.png");
    grey8(&p8, 3, 1, vec![50, 100, 200]);
    close(&input(&p8, 1, "window:50:150"), &[0.0, 0.5, 1.0], "8-bit PNG");

    let p16 = tmp.path().join("b.png");
    grey16(&p16, 3, 1, vec![500, 2000, 60000]);
    close(&input(&p16, 1, "window:1000:3000"), &[0.0, 0.5, 1.0], "16-bit PNG");

    let t16 = tmp.path().join("b.tif");
    grey16(&t16, 3, 1, vec![500, 2000, 60000]);
    close(&input(&t16, 1, "window:1000:3000"), &[0.0, 0.5, 1.0], "16-bit TIFF");

    // A flat JPEG decodes to its value exactly.
    let jpg = tmp.path().join("c.jpg");
    grey8(&jpg, 8, 8, vec![100; 64]);
    close(&input(&jpg, 1, "window:50:150"), &[0.5; 64], "JPEG");

    let ft = tmp.path().join("d.tif");
    float_tiff(&ft, 3, 1, &[-1000.0, -300.0, 1000.0]);
    close(&input(&ft, 1, "window:-1000:400"), &[0.0, 0.5, 1.0], "float32 TIFF");

    // CT slices exported as signed 16-bit TIFF, which the `image` crate refuses.
    let it = tmp.path().join("i16.tif");
    let file = std::fs::File::create(&it).unwrap();
    let mut enc = tiff::encoder::TiffEncoder::new(file).unwrap();
    enc.write_image::<tiff::encoder::colortype::GrayI16>(3, 1, &[-1024i16, -300, 3000]).unwrap();
    close(&input(&it, 1, "window:-1000:400"), &[0.0, 0.5, 1.0], "int16 TIFF");

    let vol = tmp.path().join("e.nii.gz");
    nifti(&vol, vec![-1000i16, -300, 1000]);
    close(&input(&vol, 1, "window:-1000:400"), &[0.0, 0.5, 1.0], "int16 NIfTI");
}

/// Percentile and zscore normalisation give what they gave when 2D images were read in [0, 1].
#[test]
fn percentile_and_zscore_results_are_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let v: Vec<u16> = (0..64u16).map(|i| (i * 997) % 4096).collect();
    let p16 = tmp.path().join("a.png");
    grey16(&p16, 8, 8, v.clone());
    for norm in ["percentile", "percentile:2:90", "zscore"] {
        let mut unit: Vec<f32> = v.iter().map(|&x| x as f32 / 65535.0).collect();
        norm.parse::<Normalize>().unwrap().apply(&mut unit, 1, 1.0);
        close(&input(&p16, 1, norm), &unit, norm);
    }
}

/// Grey float32 TIFFs are read as stored; a NaN or Inf in one is the non-finite error naming it.
#[test]
fn grey_float_tiffs_are_read_and_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("ct slice.tif");
    float_tiff(&good, 2, 2, &[-1024.5, 0.0, 3.25, 1e6]);
    let raw = read_raw(&good).unwrap();
    assert_eq!((raw.channels, raw.shape), (1, [1, 2, 2]));
    assert_eq!(raw.data, vec![-1024.5, 0.0, 3.25, 1e6]);
    for bad in [f32::NAN, f32::INFINITY] {
        let path = tmp.path().join(format!("bad {bad}.tif"));
        float_tiff(&path, 2, 1, &[0.0, bad]);
        let cfg = DataConfig::new(1, 1, Normalize::ZScore);
        let e = format!("{:#}", read_input(&path, &cfg).unwrap_err());
        assert!(e.contains("non-finite value") && e.contains(s(&path)), "{e}");
    }
    // Through the CLI too: predict stops on it, naming the file.
    let ck = tmp.path().join("m.unetpp");
    ok_text(&["import", "--from", s(&torch("nested_c1_k3.pth")), "--out", s(&ck)]);
    let nan = tmp.path().join("bad NaN.tif");
    fails(
        &["predict", "--checkpoint", s(&ck), "--input", s(&nan), "--out", s(&tmp.path().join("out"))],
        &["non-finite value", "bad NaN.tif"],
    );
}

fn mask_err(path: &Path, classes: usize) -> String {
    format!("{:#}", read_mask(path, classes).unwrap_err())
}

/// Labels are read in the file's own values: no wrap modulo 256, no 8-bit widened to 16-bit; a
/// label not below --classes (or above 255, the label store) is an error naming the file, the
/// value and the allowed range; non-integer labels are an error, not rounded.
#[test]
fn labels_are_the_files_own_values() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n);

    grey16(&p("ok16.png"), 3, 1, vec![0, 1, 2]);
    assert_eq!(read_mask(&p("ok16.png"), 3).unwrap().0, vec![0, 1, 2]);
    grey8(&p("ok8.png"), 3, 1, vec![0, 1, 2]);
    assert_eq!(read_mask(&p("ok8.png"), 3).unwrap().0, vec![0, 1, 2]);
    grey16(&p("binary16.png"), 3, 1, vec![0, 65535, 1]);
    assert_eq!(read_mask(&p("binary16.png"), 1).unwrap().0, vec![0, 1, 1]);

    // 258 was class 2 and 256 background (u8 wrap).
    for v in [258u16, 256] {
        let path = p(&format!("wrap{v}.png"));
        grey16(&path, 3, 1, vec![0, 1, v]);
        let e = mask_err(&path, 3);
        assert!(e.contains(s(&path)) && e.contains(&format!("label {v} ")) && e.contains("0..2"), "{e}");
    }
    // An 8-bit 3 was reported as 771 (widened to 16 bits).
    grey8(&p("three.png"), 2, 1, vec![0, 3]);
    let e = mask_err(&p("three.png"), 2);
    assert!(e.contains("label 3 ") && e.contains("0..1") && !e.contains("771"), "{e}");
    // More classes than the u8 store holds: 300 is still refused, not wrapped to 44.
    grey16(&p("big.png"), 2, 1, vec![0, 300]);
    let e = mask_err(&p("big.png"), 400);
    assert!(e.contains("label 300 ") && e.contains("0..255"), "{e}");

    nifti(&p("wrap.nii.gz"), vec![0u16, 1, 258]);
    let e = mask_err(&p("wrap.nii.gz"), 3);
    assert!(e.contains("wrap.nii.gz") && e.contains("label 258 ") && e.contains("0..2"), "{e}");
    nifti(&p("frac.nii.gz"), vec![0f32, 1.0, 1.5]);
    let e = mask_err(&p("frac.nii.gz"), 3);
    assert!(e.contains("frac.nii.gz") && e.contains("1.5") && e.contains("0..2"), "{e}");

    float_tiff(&p("ok.tif"), 3, 1, &[0.0, 2.0, 1.0]);
    assert_eq!(read_mask(&p("ok.tif"), 3).unwrap().0, vec![0, 2, 1]);
    float_tiff(&p("soft.tif"), 3, 1, &[0.0, 0.4, 1.0]);
    for classes in [1, 3] {
        let e = mask_err(&p("soft.tif"), classes);
        assert!(e.contains("soft.tif") && e.contains("0.4"), "{e}");
    }

    // Through the CLI: training stops before it starts, naming the mask.
    let data = p("data");
    std::fs::create_dir_all(data.join("images")).unwrap();
    std::fs::create_dir_all(data.join("masks")).unwrap();
    grey8(&data.join("images/a.png"), 32, 32, (0..1024).map(|i| (i % 251) as u8).collect());
    grey16(&data.join("masks/a.png"), 32, 32, (0..1024).map(|i| if i == 5 { 258 } else { (i % 2) as u16 }).collect());
    let run = p("run");
    let args = ["train", "--data", s(&data), "--out", s(&run), "--classes", "3", "--epochs", "1"];
    fails(&args, &["masks/a.png", "label 258 ", "--classes is 3", "0..2"]);
}

/// An RGB mask holding grey class ids is read as those ids; a colour one is foreground where any
/// channel is non-zero (binary) and an error for multi-class.
#[test]
fn rgb_masks() {
    let tmp = tempfile::tempdir().unwrap();
    let grey = tmp.path().join("grey.png");
    image::RgbImage::from_raw(2, 1, vec![0, 0, 0, 2, 2, 2]).unwrap().save(&grey).unwrap();
    assert_eq!(read_mask(&grey, 3).unwrap().0, vec![0, 2]);
    let colour = tmp.path().join("colour.png");
    image::RgbImage::from_raw(2, 1, vec![0, 0, 0, 0, 0, 9]).unwrap().save(&colour).unwrap();
    assert_eq!(read_mask(&colour, 1).unwrap().0, vec![0, 1]);
    let e = mask_err(&colour, 3);
    assert!(e.contains("colour.png") && e.contains("is in colour") && e.contains("0..2"), "{e}");
}
