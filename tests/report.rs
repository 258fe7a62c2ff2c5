//! report.html in a real browser: headless Chromium (tests/browser/check_report.cjs) opens each
//! report and these tests fail on any console error, failed or non-local request, image that
//! does not load, a blank screenshot, or a column header click that does not sort the table.
//! `UNETPP_NO_BROWSER=1` skips only the browser part, loudly.
mod common;
use common::*;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const INSTALL: &str = "install them with `apt-get install chromium` and \
    `npm install --prefix /var/tmp/unetpp-node playwright-core` (what .ci/run does), or set UNETPP_NO_BROWSER=1 \
    to skip the browser checks";

/// Opens `report` in headless Chromium; with `sort = (table id, column)` clicks that header twice.
/// Returns the script's JSON after checking that nothing failed and the page is not blank; None
/// only when `UNETPP_NO_BROWSER=1`.
fn browser(report: &Path, sort: Option<(&str, &str)>) -> Option<Value> {
    if std::env::var("UNETPP_NO_BROWSER").is_ok_and(|v| v == "1") {
        eprintln!(
            "\n{0}\n!!! UNETPP_NO_BROWSER=1: {1} was NOT checked in a browser !!!\n{0}\n",
            "!".repeat(72),
            report.display()
        );
        return None;
    }
    let chromium = std::env::var("UNETPP_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(Path::new(&chromium).is_file(), "no Chromium at {chromium}: {INSTALL}");
    let modules = std::env::var("UNETPP_NODE_MODULES").unwrap_or_else(|_| "/var/tmp/unetpp-node/node_modules".into());
    assert!(Path::new(&modules).join("playwright-core").is_dir(), "no playwright-core in {modules}: {INSTALL}");
    let shot = report.with_extension("screenshot.png");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/check_report.cjs");
    let mut cmd = Command::new("timeout");
    cmd.args(["120", "node", s(&script), s(report), s(&shot)]);
    if let Some((table, column)) = sort {
        cmd.args([table, column]);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run node ({e}): {INSTALL}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the browser check failed ({}):\n{stderr}", out.status);
    let v: Value = serde_json::from_slice(&out.stdout).expect("the script prints JSON");
    assert_eq!(v["errors"], serde_json::json!([]), "errors in {}", report.display());
    // A page that failed to render is one flat colour.
    let grey = image::open(&shot).unwrap().to_luma8();
    let px: Vec<f64> = grey.pixels().map(|p| p.0[0] as f64).collect();
    let mean = px.iter().sum::<f64>() / px.len() as f64;
    let var = px.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / px.len() as f64;
    assert!(var > 100.0, "the screenshot {} is blank (variance {var:.1})", shot.display());
    Some(v)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
}

fn noise_png(path: &Path, w: u32, h: u32) {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 37 % 256) as u8, (y * 91 % 256) as u8, 128]));
    img.save_with_format(path, image::ImageFormat::Png).unwrap();
}

/// A hand-written evaluation folder: hostile file names, a distance column with a missing
/// value, 2D and 3D overlays, per-label scores and a run directory with training curves.
#[test]
fn eval_report_escapes_names_sorts_and_shows_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("eval");
    std::fs::create_dir_all(out.join("overlays")).unwrap();
    let hostile = "x<img src=x onerror=alert(1)>&\"' #?";
    let names = [hostile, "b", "c d#1"];
    let dice = [0.9, 0.1, 0.5];
    let mut csv = csv::Writer::from_path(out.join("scores.csv")).unwrap();
    csv.write_record(["image", "dice", "iou", "hd95"]).unwrap();
    for ((n, d), h) in names.iter().zip(dice).zip(["3.5", "", "1.25"]) {
        csv.write_record([n.to_string(), d.to_string(), (d / (2.0 - d)).to_string(), h.to_string()]).unwrap();
    }
    csv.flush().unwrap();
    noise_png(&out.join(format!("overlays/{hostile}.png")), 48, 32);
    noise_png(&out.join("overlays/c d#1.png"), 32, 32);
    for p in ["axial", "coronal", "sagittal"] {
        noise_png(&out.join(format!("overlays/b_{p}.png")), 32, 16);
    }
    let images: Vec<Value> = names
        .iter()
        .zip(dice)
        .map(|(n, d)| serde_json::json!({"name": n, "dice": d, "per_class": [{"dice": d, "iou": d / 2.0}]}))
        .collect();
    let run = tmp.path().join("run <b>");
    std::fs::create_dir_all(run.join("checkpoints")).unwrap();
    let ck = run.join("checkpoints/best.unetpp");
    let summary = serde_json::json!({
        "summary": {"mode": "accurate", "images": 3, "mean_dice": 0.5}, "images": images, "checkpoint": ck
    });
    std::fs::write(out.join("summary.json"), summary.to_string()).unwrap();
    std::fs::write(&ck, b"not read").unwrap();
    std::fs::write(
        run.join("metrics.csv"),
        "epoch,step,train_loss,val_iou,val_dice,seconds\n1,2,0.5,0.2,0.3,1\n2,4,0.4,0.3,0.4,2\n",
    )
    .unwrap();

    let report = unetpp::report::eval(&out).unwrap();
    assert_eq!(report, out.join("report.html"));
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(!html.contains("<img src=x") && !html.contains("run <b>"), "unescaped user text");
    assert!(html.contains("x&lt;img src&#x3D;x") || html.contains("x&lt;img src=x"), "the name is missing");
    // Worst first: b (0.1), c d#1 (0.5), then the hostile name (0.9); links percent-encoded.
    let pos = |needle: &str| html.find(needle).unwrap_or_else(|| panic!("no {needle}"));
    assert!(pos("overlays/b_axial.png") < pos("overlays/c%20d%231.png"));
    assert!(
        pos("overlays/c%20d%231.png")
            < pos("overlays/x%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E%26%22%27%20%23%3F.png")
    );
    assert!(html.contains("Per label") && html.contains("Training") && html.contains("data:image/png;base64,"));

    let Some(v) = browser(&report, Some(("scores", "dice"))) else { return };
    // 2D overlays 2, volume planes 3, training curves 1: every one loaded.
    assert_eq!(v["images"], 6, "{v}");
    assert_eq!(strings(&v["before"]), names, "the table's names read back as the files are named");
    assert_eq!(strings(&v["ascending"]), ["b", "c d#1", hostile]);
    assert_eq!(strings(&v["descending"]), [hostile, "c d#1", "b"]);
    assert_eq!((v["sort_after_one"].as_str(), v["sort_after_two"].as_str()), (Some("ascending"), Some("descending")));
    // The missing distance sorts last both ways.
    let v = browser(&report, Some(("scores", "hd95"))).unwrap();
    assert_eq!(strings(&v["ascending"]), ["c d#1", hostile, "b"]);
    assert_eq!(strings(&v["descending"]), [hostile, "c d#1", "b"]);
}

#[test]
fn eval_writes_a_report_of_every_test_image() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    ok(&train_args(&samples("nuclei"), &run, Tiny::D2, &[]));
    let out = tmp.path().join("eval");
    let ck = run.join("checkpoints/best.unetpp");
    ok(&["eval", "--checkpoint", s(&ck), "--data", s(&samples("nuclei")), "--out", s(&out), "--tile", "64"]);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    let tests: Vec<String> = std::fs::read_dir(samples("nuclei/test/images"))
        .unwrap()
        .map(|e| e.unwrap().path().file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(tests.len(), 2);
    for t in &tests {
        assert!(html.contains(&format!("<td>{t}</td>")), "no row for {t}");
    }
    assert!(html.contains("Training"), "the checkpoint sits in a run directory: its curves belong in the report");
    let Some(v) = browser(&out.join("report.html"), Some(("scores", "dice"))) else { return };
    assert_eq!(v["images"], 3, "two overlays and the curves: {v}");
    let mut sorted = strings(&v["before"]);
    sorted.sort();
    let mut expected = tests.clone();
    expected.sort();
    assert_eq!(sorted, expected);
}

/// A volume's overlays are three planes through the lesion: each shows ground truth (green hits
/// or blue misses), and the report links all three.
#[test]
fn eval_of_a_volume_shows_three_planes_through_the_lesion() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let data = samples("lesions");
    ok(&train_args(&data, &run, Tiny::D3, &["--val-fraction", "0.34"]));
    let out = tmp.path().join("eval");
    ok(&["eval", "--checkpoint", s(&run.join("checkpoints/best.unetpp")), "--data", s(&data), "--out", s(&out)]);
    for p in ["axial", "coronal", "sagittal"] {
        let png = out.join(format!("overlays/lung1_{p}.png"));
        let img = image::open(&png).unwrap().to_rgb8();
        let truth = img.pixels().filter(|q| {
            let [r, g, b] = q.0;
            (g == 255 && r == b && r < 128) || (b == 255 && r == g && r < 128)
        });
        assert!(truth.count() > 0, "{} does not cut the lesion", png.display());
    }
    let header = unetpp::data::io::read_header(&data.join("test/images/lung1.nii.gz")).unwrap();
    let axial = image::image_dimensions(out.join("overlays/lung1_axial.png")).unwrap();
    assert_eq!(axial, (header.dim[1] as u32, header.dim[2] as u32));
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("overlays/lung1_coronal.png"), "{html}");
    if let Some(v) = browser(&out.join("report.html"), None) {
        assert_eq!(v["images"], 4, "three planes and the curves: {v}");
    }
}

#[test]
fn experiment_writes_an_html_report_beside_the_markdown() {
    let tmp = tempfile::tempdir().unwrap();
    let head = r#"
title = "tiny <script>alert(1)</script>"
seeds = [1]
timing = [1, 64, 64]

[[models]]
name = "UNet++ <i>DS</i> & co"
arch = "unetpp"
deep_supervision = true
"#;
    let spec = tiny_experiment(head, &samples("nuclei"));
    let spec_path = tmp.path().join("tiny.toml");
    std::fs::write(&spec_path, spec).unwrap();
    let md = tmp.path().join("docs/results.md");
    ok(&["experiment", "--spec", s(&spec_path), "--out", s(&tmp.path().join("runs")), "--report", s(&md)]);
    let report = md.with_extension("html");
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(!html.contains("<script>alert") && !html.contains("<i>DS"), "unescaped user text");
    for needle in ["Pruning", "Training curves", "UNet++ &lt;i&gt;DS", "IoU fast:1", "href=\"results.md\""] {
        assert!(html.contains(needle), "no `{needle}` in the report");
    }
    if let Some(v) = browser(&report, Some(("runs", "IoU accurate"))) {
        assert_eq!(v["images"], 2, "the pruning plot and one run's curves: {v}");
        assert_eq!(v["title"], "tiny <script>alert(1)</script>");
    }
}

fn probability_values() -> Vec<f32> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/probabilities");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("values.json")).unwrap()).unwrap();
    v["bits"].as_array().unwrap().iter().map(|b| f32::from_bits(b.as_u64().unwrap() as u32)).collect()
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn read_tiff_f32(path: &Path) -> (u32, u32, Vec<f32>) {
    let mut dec = tiff::decoder::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap())).unwrap();
    let (w, h) = dec.dimensions().unwrap();
    match dec.read_image().unwrap() {
        tiff::decoder::DecodingResult::F32(v) => (w, h, v),
        _ => panic!("{} is not 32-bit float", path.display()),
    }
}

/// The float files hold the probabilities bit for bit, and are byte for byte the files numpy and
/// tifffile read back as the same bits (scripts/probability_refs.py).
#[test]
fn probability_files_are_lossless_and_match_the_checked_references() {
    let p = probability_values();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/probabilities");
    let tmp = tempfile::tempdir().unwrap();
    for ext in ["npy", "tif"] {
        let f = tmp.path().join(format!("p.{ext}"));
        let bytes = unetpp::probabilities::encode(&f, &p, [1, 3, 5]).unwrap();
        let golden = dir.join(format!("unetpp.{ext}"));
        if std::env::var("UNETPP_BLESS").is_ok_and(|v| v == "1") {
            std::fs::write(&golden, &bytes).unwrap();
        }
        assert_eq!(bytes, std::fs::read(&golden).unwrap(), "{ext} differs from the file numpy/tifffile checked");
        std::fs::write(&f, &bytes).unwrap();
        assert!(unetpp::probabilities::is_ours(&f), "{ext} lacks the mark");
    }
    let (w, h, v) = read_tiff_f32(&tmp.path().join("p.tif"));
    assert!((w, h) == (5, 3) && same_bits(&v, &p));
    let (shape, v) = unetpp::probabilities::read_npy(&tmp.path().join("p.npy")).unwrap();
    assert!(shape == [3, 5] && same_bits(&v, &p));
    // A user's float TIFF and a numpy file without the mark are not ours.
    let mut user = std::io::Cursor::new(vec![]);
    tiff::encoder::TiffEncoder::new(&mut user)
        .unwrap()
        .write_image::<tiff::encoder::colortype::Gray32Float>(5, 3, &p)
        .unwrap();
    std::fs::write(tmp.path().join("user.tif"), user.into_inner()).unwrap();
    let mut plain = std::fs::read(dir.join("unetpp.npy")).unwrap();
    let at = plain.windows(10).position(|w| w == b"} # unetpp").unwrap();
    plain[at + 1..at + 10].fill(b' ');
    std::fs::write(tmp.path().join("user.npy"), plain).unwrap();
    assert!(!unetpp::probabilities::is_ours(&tmp.path().join("user.tif")));
    assert!(!unetpp::probabilities::is_ours(&tmp.path().join("user.npy")));
}

/// `predict --probabilities`: bare writes float TIFF holding the model's probabilities bit for
/// bit, `npy` the same as float32, `png` the old 8-bit map; its own files are replaced on a rerun,
/// a user's file is not; a volume gets float NIfTI or npy and refuses tiff/png before writing.
#[test]
fn predict_writes_lossless_probabilities() {
    use burn::prelude::Device;
    use unetpp::probabilities::Format;
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let nuclei = samples("nuclei");
    ok(&train_args(&nuclei, &run, Tiny::D2, &[]));
    let ck = run.join("checkpoints/best.unetpp");
    let stem = "2023-05-31_misc_MCC13_rfpcyto_w1cDAPI_s43";
    let image = nuclei.join(format!("test/images/{stem}.tif"));

    // In memory and on disk, through the library.
    let device = Device::flex();
    let (model, meta) = unetpp::checkpoint::load::<4>(&ck, &device).unwrap();
    let model = model.fold_batchnorm();
    let sample = unetpp::infer::read_unlabelled(&image, &meta.data).unwrap();
    let sliding = unetpp::infer::Sliding::new([1, 64, 64]);
    let accurate = [unetpp::model::Mode::Accurate];
    let p = unetpp::infer::probabilities(std::slice::from_ref(&model), &sample, &accurate, &sliding, &device)
        .unwrap()
        .remove(0);
    assert!(p.iter().any(|&v| v > 0.01 && v < 0.99 && (v * 255.0).fract() != 0.0), "nothing an 8-bit file would lose");
    let pred = unetpp::infer::labels(&p, 1);
    let lib = tmp.path().join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    for format in [Format::Lossless, Format::Npy] {
        let paths = unetpp::infer::writer::prediction(&lib, &sample, &pred, &p, 1, Some(format)).unwrap();
        let back = match format {
            Format::Npy => {
                let (shape, v) = unetpp::probabilities::read_npy(&paths[1]).unwrap();
                assert_eq!(shape, [192, 192]);
                v
            }
            _ => read_tiff_f32(&paths[1]).2,
        };
        assert!(same_bits(&back, &p), "{} does not hold the probabilities bit for bit", paths[1].display());
    }

    // Through the CLI: bare --probabilities is the float TIFF.
    let out = tmp.path().join("pred");
    let predict = |extra: &[&str]| {
        let mut a = vec!["predict", "--checkpoint", s(&ck), "--input", s(&image), "--out", s(&out), "--tile", "64"];
        a.extend(extra);
        unetpp(&a)
    };
    assert!(predict(&["--probabilities"]).status.success());
    let tif = out.join(format!("{stem}_prob0.tif"));
    let (w, h, v) = read_tiff_f32(&tif);
    assert_eq!((w, h), (192, 192));
    let worst = v.iter().zip(&p).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-6, "the CLI's probabilities differ from the library's by {worst}");
    assert!(predict(&["--probabilities"]).status.success(), "a rerun replaces its own TIFF");
    assert!(predict(&["--probabilities", "npy"]).status.success());
    let (_, v) = unetpp::probabilities::read_npy(&out.join(format!("{stem}_prob0.npy"))).unwrap();
    assert!(v.iter().zip(&p).all(|(a, b)| (a - b).abs() <= 1e-6));
    assert!(predict(&["--probabilities", "png"]).status.success());
    let png = image::open(out.join(format!("{stem}_prob0.png"))).unwrap().to_luma8().into_raw();
    assert!(png.iter().zip(&p).all(|(&g, &q)| (g as f32 - q * 255.0).abs() <= 0.5 + 1e-3));
    // A user's float TIFF where the probabilities would go is refused, untouched.
    let mut user = std::io::Cursor::new(vec![]);
    tiff::encoder::TiffEncoder::new(&mut user)
        .unwrap()
        .write_image::<tiff::encoder::colortype::Gray32Float>(2, 1, &[0.25, 0.5])
        .unwrap();
    std::fs::write(&tif, user.get_ref()).unwrap();
    let refused = predict(&["--probabilities"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(refused.status.code() == Some(1) && err.contains("not written by unetpp"), "{err}");
    assert_eq!(std::fs::read(&tif).unwrap(), user.into_inner());
    let bad = predict(&["--probabilities", "jpeg"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && ["tiff", "npy", "png"].iter().all(|k| err.contains(k)), "{err}");

    // Volumes: float NIfTI or npy; tiff and png are refused before anything is written.
    let run3 = tmp.path().join("run3");
    let lesions = samples("lesions");
    ok(&train_args(&lesions, &run3, Tiny::D3, &["--val-fraction", "0.34"]));
    let ck3 = run3.join("checkpoints/best.unetpp");
    let volume = lesions.join("test/images/lung1.nii.gz");
    let out3 = tmp.path().join("pred3");
    for kind in ["tiff", "png"] {
        let r = unetpp(&[
            "predict",
            "--checkpoint",
            s(&ck3),
            "--input",
            s(&volume),
            "--out",
            s(&out3),
            "--probabilities",
            kind,
        ]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(r.status.code() == Some(1) && err.contains("is a volume") && err.contains("npy"), "{err}");
        assert!(!out3.exists(), "nothing may be written");
    }
    ok(&["predict", "--checkpoint", s(&ck3), "--input", s(&volume), "--out", s(&out3), "--probabilities", "npy"]);
    let (shape, _) = unetpp::probabilities::read_npy(&out3.join("lung1_prob0.npy")).unwrap();
    let dim = unetpp::data::io::read_header(&volume).unwrap().dim;
    assert_eq!(shape, [dim[3] as usize, dim[2] as usize, dim[1] as usize]);
    ok(&["predict", "--checkpoint", s(&ck3), "--input", s(&volume), "--out", s(&out3), "--probabilities"]);
    assert!(unetpp::output::is_ours(&out3.join("lung1_prob0.nii.gz")));
}
