//! Every option and input is checked before anything is written (issue #16): a bad value is
//! exit 1 with a message naming the option (or the file and tensor) and what it allows, never
//! a panic, an abort or a silently useless result, and no run folder or output is left behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::prelude::*;
use unetpp::checkpoint::{self, Meta};
use unetpp::data::{DataConfig, Normalize};
use unetpp::model::{Arch, ModelConfig, Preset};

fn unetpp_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_unetpp"));
    c.args(args).env_remove("UNETPP_MEMORY_GB");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("binary runs")
}

/// Runs a command that must fail cleanly (exit `code`, no panic) with every needle in stderr.
fn fails_with(code: i32, args: &[&str], env: &[(&str, &str)], needles: &[&str]) -> String {
    let out = unetpp_env(args, env);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "unetpp {args:?} should fail with exit {code}, stderr:\n{err}");
    assert!(!err.contains("panicked"), "panic instead of an error:\n{err}");
    for n in needles {
        assert!(err.contains(n), "unetpp {args:?}: stderr lacks `{n}`:\n{err}");
    }
    err
}

fn fails(args: &[&str], needles: &[&str]) -> String {
    fails_with(1, args, &[], needles)
}

fn samples(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("samples").join(name)
}

fn torch(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/torch").join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A tiny 2D training command on the bundled nuclei sample, with `over` replacing (or adding)
/// options; `None` as a value drops the option.
fn train_args(out: &Path, over: &[(&str, Option<&str>)]) -> Vec<String> {
    let mut opts: Vec<(String, Option<String>)> = [
        ("--data", s(&samples("nuclei"))),
        ("--out", s(out)),
        ("--width", "4"),
        ("--depth", "2"),
        ("--epochs", "1"),
        ("--steps-per-epoch", "1"),
        ("--batch-size", "2"),
        ("--patch", "32"),
        ("--tile", "64"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), Some(v.to_string())))
    .collect();
    for (k, v) in over {
        match opts.iter_mut().find(|(o, _)| o == k) {
            Some(slot) => slot.1 = v.map(str::to_string),
            None => opts.push((k.to_string(), v.map(str::to_string))),
        }
    }
    let mut a = vec!["train".to_string()];
    for (k, v) in opts.into_iter().filter(|(_, v)| v.is_some()) {
        // `--k=v`: a value starting with `-` is not read as an option.
        a.push(format!("{k}={}", v.unwrap()));
    }
    a
}

/// `train` with one bad option fails naming it, and leaves no run folder behind.
fn train_fails(over: &[(&str, Option<&str>)], needles: &[&str]) {
    train_fails_env(over, &[], needles)
}

fn train_fails_env(over: &[(&str, Option<&str>)], env: &[(&str, &str)], needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let a = train_args(&out, over);
    fails_with(1, &a.iter().map(String::as_str).collect::<Vec<_>>(), env, needles);
    assert!(!out.exists(), "{} was created for a refused run ({a:?})", out.display());
}

#[test]
fn bad_training_options_are_refused_by_name_before_any_write() {
    for (opt, value, needles) in [
        ("--epochs", "0", &["--epochs", "at least 1"][..]),
        ("--steps-per-epoch", "0", &["--steps-per-epoch", "at least 1"]),
        ("--batch-size", "0", &["--batch-size", "at least 1"]),
        ("--lr", "-1", &["--lr", "(0, 1]"]),
        ("--lr", "0", &["--lr", "(0, 1]"]),
        ("--lr", "NaN", &["--lr", "(0, 1]"]),
        ("--lr", "inf", &["--lr", "(0, 1]"]),
        ("--foreground", "2", &["--foreground", "[0, 1]"]),
        ("--foreground", "NaN", &["--foreground", "[0, 1]"]),
        ("--foreground", "-0.1", &["--foreground", "[0, 1]"]),
        ("--patience", "0", &["--patience", "at least 1"]),
        ("--val-fraction", "0", &["--val-fraction", "(0, 1)"]),
        ("--val-fraction", "1", &["--val-fraction", "(0, 1)"]),
        ("--val-fraction", "1.5", &["--val-fraction", "(0, 1)"]),
        ("--val-fraction", "NaN", &["--val-fraction", "(0, 1)"]),
        ("--patch", "0", &["--patch 0,0", "divisible by 2^depth = 4", "e.g. --patch 4,4"]),
        ("--patch", "30", &["--patch 30,30", "divisible by 2^depth = 4", "e.g. --patch 32,32"]),
        ("--tile", "0", &["--tile 0,0", "divisible by 2^depth = 4"]),
        ("--tile", "62", &["--tile 62,62", "e.g. --tile 64,64"]),
        ("--depth", "0", &["--depth", "1..=5"]),
        ("--depth", "6", &["--depth", "1..=5"]),
        ("--width", "0", &["--width", "at least 1"]),
        ("--channels", "0", &["--channels", "1..=255"]),
        ("--channels", "256", &["--channels", "1..=255"]),
        ("--classes", "0", &["--classes", "1..=255"]),
        ("--classes", "256", &["--classes", "1..=255"]),
        ("--decoder-channels", "0,0", &["--decoder-channels", "at least 1"]),
        ("--decoder-channels", "8,8,8", &["--decoder-channels", "one width per level (2 for --depth 2)"]),
    ] {
        train_fails(&[(opt, Some(value))], needles);
    }
}

#[test]
fn a_patch_or_batch_beyond_memory_is_refused_naming_the_options() {
    // 10^10 voxels a patch: terabytes, on any machine.
    train_fails(
        &[("--patch", Some("100000"))],
        &["--patch 100000,100000", "--batch-size 2", "GiB", "UNETPP_MEMORY_GB"],
    );
    // A normal tiny run under a tiny limit: the override is read, and named.
    train_fails_env(
        &[],
        &[("UNETPP_MEMORY_GB", "0.001")],
        &["--patch 32,32", "--batch-size 2", "UNETPP_MEMORY_GB=0.001"],
    );
    train_fails_env(&[], &[("UNETPP_MEMORY_GB", "lots")], &["UNETPP_MEMORY_GB=lots", "positive number of GiB"]);
    // --width drives the parameters as well as the activations.
    fails(&["info", "--width", "1000000"], &["million parameters", "--width 1000000", "GiB"]);
}

#[test]
fn empty_or_inverted_normalisation_ranges_are_refused() {
    for bad in
        ["window:5:5", "window:400:-1000", "window:nan:1", "percentile:99:1", "percentile:-1:50", "percentile:1:101"]
    {
        let err = bad.parse::<Normalize>().unwrap_err();
        assert!(err.contains("--normalize") && err.contains("LOW < HIGH"), "{bad}: {err}");
        // From the command line clap reports it (its usage errors exit 2), naming the option.
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("run");
        let a = train_args(&out, &[("--normalize", Some(bad))]);
        fails_with(2, &a.iter().map(String::as_str).collect::<Vec<_>>(), &[], &["--normalize", "LOW < HIGH"]);
        assert!(!out.exists());
    }
    for good in ["window:-1000:400", "percentile:0:100", "percentile:0.5:99.5", "zscore", "imagenet"] {
        good.parse::<Normalize>().unwrap();
    }
}

/// A valid tiny run's configuration, as `train` would save it.
fn tiny_config(data: &Path) -> unetpp::train::TrainConfig {
    let model = ModelConfig { width: 4, ..ModelConfig::new(Arch::Unetpp, Preset::Modern, 2) };
    unetpp::train::TrainConfig {
        data: data.to_path_buf(),
        input: DataConfig::new(1, 1, Normalize::Percentile { low: 0.5, high: 99.5 }),
        model,
        epochs: 1,
        steps_per_epoch: 1,
        batch_size: 2,
        lr: 3e-4,
        patch: [1, 32, 32],
        foreground: 0.33,
        patience: 5,
        seed: 1,
        val_fraction: 0.2,
        tile: [1, 64, 64],
        val_crop: [1, 64, 64],
        skip_bad: false,
        backend: Default::default(),
        weights: None,
        plan: None,
        fold: None,
        cache: Default::default(),
        recipe: Default::default(),
    }
}

#[test]
fn a_config_file_goes_through_the_same_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tiny_config(&samples("nuclei"));
    good.validate().unwrap();
    let cases: Vec<(&str, unetpp::train::TrainConfig, &[&str])> = vec![
        ("batch", unetpp::train::TrainConfig { batch_size: 0, ..good.clone() }, &["--batch-size"]),
        ("lr", unetpp::train::TrainConfig { lr: -1.0, ..good.clone() }, &["--lr"]),
        ("fg", unetpp::train::TrainConfig { foreground: 2.0, ..good.clone() }, &["--foreground"]),
        (
            "window",
            unetpp::train::TrainConfig {
                input: DataConfig { normalize: Normalize::Window { low: 5.0, high: 5.0 }, ..good.input.clone() },
                ..good.clone()
            },
            &["--normalize window:5:5"],
        ),
        (
            "classes",
            unetpp::train::TrainConfig { input: DataConfig { classes: 3, ..good.input.clone() }, ..good.clone() },
            &["differ from the model's"],
        ),
        ("crop", unetpp::train::TrainConfig { val_crop: [1, 0, 64], ..good.clone() }, &["val_crop"]),
    ];
    for (name, cfg, needles) in cases {
        assert!(cfg.validate().is_err(), "{name}");
        let file = tmp.path().join(format!("{name}.toml"));
        std::fs::write(&file, toml::to_string(&cfg).unwrap()).unwrap();
        let out = tmp.path().join(format!("run-{name}"));
        let mut want = needles.to_vec();
        want.push(s(&file));
        fails(&["train", "--config", s(&file), "--out", s(&out)], &want);
        assert!(!out.exists(), "{name}: run folder created");
        // The library refuses it too (the check is `train`'s, not the CLI's), without a write.
        let err = unetpp::app::train(Some(cfg), &out).err().unwrap();
        assert!(format!("{err:#}").contains(needles[0]), "{name}: {err:#}");
        assert!(!out.exists(), "{name}: run folder created by the library");
    }
    // A resumed run re-checks the configuration it finds.
    let run = tmp.path().join("tampered");
    std::fs::create_dir_all(&run).unwrap();
    let cfg = unetpp::train::TrainConfig { epochs: 0, ..good };
    std::fs::write(run.join("config.toml"), toml::to_string(&cfg).unwrap()).unwrap();
    fails(&["train", "--resume", s(&run)], &["--epochs"]);
    assert!(!run.join("checkpoints").exists());
}

/// Writes a freshly initialised checkpoint of `model` (no training needed to test refusals).
fn checkpoint(dir: &Path, name: &str, model: ModelConfig) -> PathBuf {
    let path = dir.join(name);
    let meta = Meta { data: DataConfig::new(1, 1, Normalize::ZScore), model: model.clone(), epoch: 1, val_iou: None };
    let device = Device::flex();
    match model.dims {
        2 => checkpoint::save(&model.init::<4>(&device), &meta, &path).unwrap(),
        _ => checkpoint::save(&model.init::<5>(&device), &meta, &path).unwrap(),
    }
    path
}

fn tiny(dims: usize) -> ModelConfig {
    ModelConfig { width: 2, dims, ..ModelConfig::new(Arch::Unetpp, Preset::Modern, 2) }
}

#[test]
fn a_model_on_data_of_the_other_dimensionality_is_refused_naming_file_and_dims() {
    let tmp = tempfile::tempdir().unwrap();
    let (ck2, ck3) = (checkpoint(tmp.path(), "2d.unetpp", tiny(2)), checkpoint(tmp.path(), "3d.unetpp", tiny(3)));
    let out = tmp.path().join("out");
    let nuclei = samples("nuclei");
    let lesions = samples("lesions");
    let image = nuclei.join("test/images/2023-05-31_misc_MCC13_rfpcyto_w1cDAPI_s43.tif");
    let volume = lesions.join("test/images/lung1.nii.gz");
    for (ck, data, needles) in [
        (&ck3, &nuclei, ["is a 2D image", "3d.unetpp", "is a 3D model"]),
        (&ck2, &lesions, ["is a 3D volume", "2d.unetpp", "is a 2D model"]),
    ] {
        fails(&["eval", "--checkpoint", s(ck), "--data", s(data), "--out", s(&out)], &needles);
        assert!(!out.exists());
    }
    for (ck, input, needles) in [
        (&ck3, &image, ["s43.tif is a 2D image", "3d.unetpp", "is a 3D model"]),
        (&ck3, &nuclei.join("test/images"), ["is a 2D image", "3d.unetpp", "is a 3D model"]),
        (&ck2, &volume, ["lung1.nii.gz is a 3D volume (16 slices)", "2d.unetpp", "is a 2D model"]),
    ] {
        fails(&["predict", "--checkpoint", s(ck), "--input", s(input), "--out", s(&out)], &needles);
        assert!(!out.exists());
    }
    // Training: a 3D model on 2D images (the reverse was already refused by the loader).
    train_fails(
        &[("--dims", Some("3")), ("--patch", Some("4,32,32")), ("--tile", Some("4,64,64"))],
        &["is a 2D image", "--dims 3"],
    );
}

#[test]
fn bad_inference_options_are_refused_before_any_output() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = checkpoint(tmp.path(), "ds.unetpp", tiny(2));
    let data = samples("nuclei");
    let out = tmp.path().join("out");
    let image = data.join("test/images/2023-05-31_misc_MCC13_rfpcyto_w1cDAPI_s43.tif");
    for (opt, value, needles) in [
        ("--mode", "fast:0", &["--mode fast:0", "[1, 2]", "fast:1, fast:2"][..]),
        ("--mode", "fast:9", &["--mode fast:9", "[1, 2]"]),
        ("--tile", "0", &["--tile 0,0", "divisible by 2^depth = 4"]),
        ("--tile", "30", &["--tile 30,30", "e.g. --tile 32,32"]),
        ("--tile", "100000", &["--tile 100000,100000", "GiB"]),
    ] {
        let eval = ["eval", "--checkpoint", s(&ck), "--data", s(&data), "--out", s(&out), opt, value];
        fails(&eval, needles);
        assert!(!out.exists(), "eval {opt} {value} created its output folder");
        let predict = ["predict", "--checkpoint", s(&ck), "--input", s(&image), "--out", s(&out), opt, value];
        fails(&predict, needles);
        assert!(!out.exists(), "predict {opt} {value} created its output folder");
    }
}

#[test]
fn prune_and_info_check_their_options() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = checkpoint(tmp.path(), "ds.unetpp", tiny(2));
    let out = tmp.path().join("pruned.unetpp");
    for level in ["0", "3", "9"] {
        fails(
            &["prune", "--checkpoint", s(&ck), "--level", level, "--out", s(&out)],
            &[&format!("--level {level}"), "[1, 2]"],
        );
        assert!(!out.exists());
    }
    // Writing the output over the input would lose it.
    let before = std::fs::read(&ck).unwrap();
    fails(&["prune", "--checkpoint", s(&ck), "--level", "1", "--out", s(&ck)], &["--out", "is the input"]);
    fails(&["export", "--checkpoint", s(&ck), "--out", s(&ck)], &["--out", "is the input"]);
    assert_eq!(std::fs::read(&ck).unwrap(), before, "the checkpoint was overwritten");
    for (args, needle) in [
        (&["info", "--width", "0"][..], "--width"),
        (&["info", "--depth", "0"], "--depth"),
        (&["info", "--depth", "2", "--decoder-channels", "0,0"], "--decoder-channels"),
        (&["info", "--classes", "300"], "--classes"),
        (&["info", "--channels", "0"], "--channels"),
    ] {
        fails(args, &[needle]);
    }
}

/// A safetensors file's tensors, to be edited into bad ones.
type Raw = BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;

fn read_st(path: &Path) -> Raw {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect()
}

fn write_st(path: &Path, raw: &Raw) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = raw
        .iter()
        .map(|(k, (d, s, b))| (k.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `import` of `from` fails naming the file and `needles`, writing nothing.
fn import_fails(from: &Path, needles: &[&str]) {
    let out = from.with_extension("unetpp");
    let mut want = vec![s(from)];
    want.extend(needles);
    fails(&["import", "--from", s(from), "--out", s(&out)], &want);
    assert!(!out.exists(), "{} written", out.display());
}

#[test]
fn bad_checkpoints_are_refused_at_import_naming_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    // nested_c1_k3: a NestedUNet with one input channel, three classes and one head.
    let good = read_st(&torch("nested_c1_k3.safetensors"));
    let head = good["final.weight"].1.clone();
    let first = good["conv0_0.conv1.weight"].1.clone();
    let edit = |name: &str, f: &dyn Fn(&mut Raw)| {
        let mut raw = good.clone();
        f(&mut raw);
        let path = tmp.path().join(format!("{name}.safetensors"));
        write_st(&path, &raw);
        path
    };
    // A scalar where the head's weight should be.
    let p = edit("scalar_head", &|r| {
        r.insert("final.weight".into(), (safetensors::Dtype::F32, vec![], f32s(&[1.0])));
    });
    import_fails(&p, &["`final.weight` has shape []", &format!("expected [classes, {}, 1, 1]", first[0])]);
    // A weight of the wrong rank inside the grid.
    let p = edit("flat_conv", &|r| {
        let (d, s, b) = r["conv1_1.conv2.weight"].clone();
        r.insert("conv1_1.conv2.weight".into(), (d, vec![s.iter().product()], b));
    });
    import_fails(&p, &["`conv1_1.conv2.weight` has shape [", "expected ["]);
    // No input channels.
    let p = edit("in0", &|r| {
        r.insert("conv0_0.conv1.weight".into(), (safetensors::Dtype::F32, vec![first[0], 0, 3, 3], vec![]));
    });
    import_fails(&p, &["`conv0_0.conv1.weight` has shape [", ", 0, 3, 3]"]);
    // No classes.
    let p = edit("classes0", &|r| {
        r.insert("final.weight".into(), (safetensors::Dtype::F32, vec![0, head[1], 1, 1], vec![]));
        r.insert("final.bias".into(), (safetensors::Dtype::F32, vec![0], vec![]));
    });
    import_fails(&p, &["`final.weight` has shape [0, "]);
    // A NaN and an infinity among the weights.
    for (name, bad) in [("nan", f32::NAN), ("inf", f32::INFINITY)] {
        let p = edit(name, &|r| {
            let t = r.get_mut("conv2_0.conv2.weight").unwrap();
            t.2[40..44].copy_from_slice(&bad.to_le_bytes());
        });
        import_fails(&p, &["`conv2_0.conv2.weight`", "non-finite", "index 10"]);
    }
    // A .pth whose 1 KB declares 6.8 GiB of `expand`ed tensors (scripts/bad_pth.py).
    let pth = tmp.path().join("expanded.pth");
    std::fs::copy(torch("expanded.pth"), &pth).unwrap();
    import_fails(&pth, &["declares", "bytes but the whole file is", "expand"]);
    // The unedited file still imports.
    let ok = tmp.path().join("ok.safetensors");
    write_st(&ok, &good);
    let out = unetpp_env(&["import", "--from", s(&ok), "--out", s(&tmp.path().join("ok.unetpp"))], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn bad_smp_checkpoints_are_refused_too() {
    let tmp = tempfile::tempdir().unwrap();
    let good = read_st(&torch("smp_resnet34.safetensors"));
    let mut raw = good.clone();
    raw.insert("segmentation_head.0.weight".into(), (safetensors::Dtype::F32, vec![], f32s(&[1.0])));
    let p = tmp.path().join("smp_scalar.safetensors");
    write_st(&p, &raw);
    import_fails(&p, &["`segmentation_head.0.weight` has shape []", "expected [classes"]);
    let mut raw = good;
    let t = raw.get_mut("decoder.blocks.x_0_0.conv2.0.weight").unwrap();
    // This file is float16.
    t.2[..2].copy_from_slice(&half::f16::NAN.to_le_bytes());
    let p = tmp.path().join("smp_nan.safetensors");
    write_st(&p, &raw);
    import_fails(&p, &["`decoder.blocks.x_0_0.conv2.0.weight`", "non-finite"]);
}

/// The training-memory estimate against peak RSS measured with `unetpp bench --train-only`
/// (UNet++ L4, modern, width 32; docs/reliability.md): it may overestimate (refusing only what
/// cannot fit by a margin) but not underestimate, nor overestimate so much that runs which fit
/// are refused.
#[test]
fn memory_estimate_brackets_measured_peaks() {
    for (dims, voxels, batch, measured_mb) in [(2, 96 * 96, 4, 370.0), (3, 64 * 64 * 64, 1, 1846.0)] {
        let cfg = ModelConfig { dims, ..ModelConfig::new(Arch::Unetpp, Preset::Modern, 4) };
        let est = cfg.training_bytes(voxels, batch) / (1 << 20) as f64;
        assert!(
            (measured_mb..=2.0 * measured_mb).contains(&est),
            "{dims}D batch {batch} of {voxels} voxels: estimate {est:.0} MiB, measured peak {measured_mb} MB"
        );
    }
}
