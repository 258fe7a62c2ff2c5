//! `report.html`: one self-contained page per evaluation (`eval`) or comparison (`experiment`)
//! that opens offline in any browser. Styles, script and plots are inline; overlays are
//! relative links into the evaluation folder. Every string that comes from the user (file
//! names, model names, spec titles) is escaped.

pub mod page;
pub mod volume;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

use crate::experiment::RunResult;
use crate::metrics::mean_std;
use page::{Cell, esc, href, png_data_uri, table};

const LEGEND: &str = "<p class=\"legend\">Overlays:<span style=\"background:#0f0\"></span>true positive\
    <span style=\"background:#f00\"></span>false positive<span style=\"background:#00f\"></span>missed</p>\n";

/// The per-image table of `scores.csv` as written, whatever its columns: the first names the
/// image, the others are numbers where they parse.
fn read_scores(csv: &Path) -> anyhow::Result<(Vec<String>, Vec<Vec<Cell>>)> {
    let mut r = csv::Reader::from_path(csv).with_context(|| format!("cannot read {}", csv.display()))?;
    let headers: Vec<String> =
        r.headers().with_context(|| format!("{}", csv.display()))?.iter().map(String::from).collect();
    let mut rows = vec![];
    for rec in r.records() {
        let rec = rec.with_context(|| format!("{}", csv.display()))?;
        rows.push(
            rec.iter()
                .enumerate()
                .map(|(i, v)| match v.trim().parse::<f64>() {
                    Ok(x) if i > 0 => Cell::shown(v, x),
                    // A metric that does not exist for this image (a distance to an empty mask).
                    _ if i > 0 && v.trim().is_empty() => Cell::shown("–", f64::NAN),
                    _ => Cell::text(v),
                })
                .collect(),
        );
    }
    Ok((headers, rows))
}

fn fmt_value(v: &Value) -> String {
    match v {
        Value::Number(n) if n.is_f64() => format!("{:.4}", n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The `curves.png` of the run a checkpoint was trained in (`RUN/checkpoints/*.unetpp`), drawn
/// afresh from its `metrics.csv`.
fn run_curves(ck: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    let Some(run) = ck.parent().filter(|d| d.file_name().is_some_and(|n| n == "checkpoints")).and_then(Path::parent)
    else {
        return Ok(None);
    };
    let csv = run.join("metrics.csv");
    if !csv.is_file() {
        return Ok(None);
    }
    crate::plot::curves_png(&csv)
}

/// Statistics over images of each label's metrics from `summary.json`'s `images[].per_class`.
fn per_label(images: &[Value]) -> (Vec<String>, Vec<Vec<Cell>>) {
    let mut keys: Vec<String> = vec![];
    let mut values: Vec<Vec<Vec<f64>>> = vec![];
    for img in images {
        let Some(per) = img.get("per_class").and_then(Value::as_array) else { continue };
        for (c, obj) in per.iter().enumerate() {
            let Some(obj) = obj.as_object() else { continue };
            for (k, v) in obj {
                let Some(x) = v.as_f64() else { continue };
                let j = keys.iter().position(|q| q == k).unwrap_or_else(|| {
                    keys.push(k.clone());
                    keys.len() - 1
                });
                values.resize(values.len().max(c + 1), vec![]);
                let per = &mut values[c];
                per.resize(per.len().max(j + 1), vec![]);
                per[j].push(x);
            }
        }
    }
    let headers = ["label", "metric", "images", "mean", "std", "min", "max"].map(String::from).to_vec();
    let mut rows = vec![];
    for (c, per) in values.iter().enumerate() {
        for (j, v) in per.iter().enumerate() {
            let (m, s) = mean_std(v);
            let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
            rows.push(vec![
                Cell::shown(format!("label {}", c + 1), (c + 1) as f64),
                Cell::text(keys[j].clone()),
                Cell::shown(v.len().to_string(), v.len() as f64),
                Cell::num(m),
                Cell::num(s),
                Cell::num(lo),
                Cell::num(hi),
            ]);
        }
    }
    (headers, rows)
}

/// The checkpoints `summary.json` names: every member of an ensemble (`checkpoints`), else the
/// one `checkpoint`.
fn checkpoints_of(summary: &Value) -> Vec<PathBuf> {
    let listed = summary.get("checkpoints").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let one = summary.get("checkpoint").into_iter();
    let names = if listed.is_empty() { one.collect::<Vec<_>>() } else { listed.iter().collect() };
    names.into_iter().filter_map(Value::as_str).map(PathBuf::from).collect()
}

/// `<dt>`/`<dd>` rows of what made the predictions: each checkpoint, the post-processing and how
/// windows slid (`summary.json`'s `checkpoints`, `postprocess` and `inference`).
fn provenance(summary: &Value, cks: &[PathBuf]) -> anyhow::Result<String> {
    let mut dl = String::new();
    let label = if cks.len() > 1 { format!("checkpoints (ensemble of {})", cks.len()) } else { "checkpoint".into() };
    let items: Vec<String> = cks.iter().map(|c| format!("<li>{}</li>", esc(&c.display().to_string()))).collect();
    write!(dl, "<dt>{label}</dt><dd><ol class=\"checkpoints\">{}</ol></dd>", items.join(""))?;
    let pp = match summary.get("postprocess").and_then(Value::as_str) {
        Some(f) => format!("as decided in {f}"),
        None => "none".into(),
    };
    write!(dl, "<dt>post-processing</dt><dd>{}</dd>", esc(&pp))?;
    let Some(inf) = summary.get("inference") else { return Ok(dl) };
    let on = |v: &Value| if v.as_bool() == Some(true) { "on (mirrored copies averaged)" } else { "off" };
    let tile: Vec<String> = inf["tile"].as_array().into_iter().flatten().map(Value::to_string).collect();
    let batch = inf["window_batch"].as_u64().map_or("as memory allows".into(), |b| b.to_string());
    for (k, v) in [
        ("test-time augmentation", on(&inf["tta"]).to_string()),
        ("window", tile.join(" x ")),
        ("window overlap", fmt_value(&inf["overlap"])),
        ("windows per pass", batch),
    ] {
        write!(dl, "<dt>{k}</dt><dd>{}</dd>", esc(&v))?;
    }
    Ok(dl)
}

/// Writes `out/report.html` for an evaluation already written to `out` (`scores.csv`,
/// `summary.json`, `overlays/`); returns its path.
pub fn eval(out: &Path) -> anyhow::Result<PathBuf> {
    let (headers, rows) = read_scores(&out.join("scores.csv"))?;
    let summary_path = out.join("summary.json");
    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(&summary_path).with_context(|| format!("cannot read {}", summary_path.display()))?,
    )
    .with_context(|| format!("cannot parse {}", summary_path.display()))?;
    let cks = checkpoints_of(&summary);
    let mut body = String::from("<h2>Summary</h2>\n<dl class=\"summary\">");
    body.push_str(&provenance(&summary, &cks)?);
    if let Some(obj) = summary.get("summary").and_then(Value::as_object) {
        for (k, v) in obj {
            write!(body, "<dt>{}</dt><dd>{}</dd>", esc(k), esc(&fmt_value(v)))?;
        }
    }
    body.push_str("</dl>\n<h2>Per image</h2>\n<p class=\"note\">Click a column header to sort.</p>\n");
    body.push_str(&table("scores", &headers, &rows));

    // Worst first by Dice (the second column if there is none); unscored images last.
    let key = headers.iter().position(|h| h.eq_ignore_ascii_case("dice")).unwrap_or(1);
    let mut order: Vec<&Vec<Cell>> = rows.iter().collect();
    let score = |r: &Vec<Cell>| r.get(key).and_then(|c| c.num).filter(|v| v.is_finite()).unwrap_or(f64::INFINITY);
    order.sort_by(|a, b| score(a).total_cmp(&score(b)));
    let mut gallery = String::new();
    for r in order {
        let name = &r[0].text;
        let caption = format!("{name} — {} {}", headers.get(key).map_or("", |s| s), r.get(key).map_or("", |c| &c.text));
        let flat = PathBuf::from("overlays").join(format!("{name}.png"));
        let planes: Vec<PathBuf> =
            volume::PLANES.iter().map(|p| PathBuf::from("overlays").join(format!("{name}_{p}.png"))).collect();
        if out.join(&flat).is_file() {
            let h = href(&flat);
            writeln!(
                gallery,
                "<figure><a href=\"{h}\" target=\"_blank\"><img src=\"{h}\" alt=\"{}\" loading=\"lazy\"></a>\
                 <figcaption>{}</figcaption></figure>",
                esc(name),
                esc(&caption)
            )?;
        } else if planes.iter().all(|p| out.join(p).is_file()) {
            gallery.push_str("<figure class=\"volume\"><div class=\"planes\">");
            for (p, plane) in planes.iter().zip(volume::PLANES) {
                let h = href(p);
                write!(
                    gallery,
                    "<a href=\"{h}\" target=\"_blank\"><img src=\"{h}\" alt=\"{} {plane}\" loading=\"lazy\"></a>",
                    esc(name)
                )?;
            }
            writeln!(gallery, "</div><figcaption>{} (axial, coronal, sagittal)</figcaption></figure>", esc(&caption))?;
        }
    }
    if !gallery.is_empty() {
        body.push_str("<h2>Overlays, worst first</h2>\n");
        body.push_str(LEGEND);
        writeln!(body, "<div class=\"gallery\">\n{gallery}</div>")?;
    }
    let images = summary.get("images").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let (lh, lr) = per_label(images);
    if !lr.is_empty() {
        body.push_str("<h2>Per label</h2>\n");
        body.push_str(&table("labels", &lh, &lr));
    }
    let mut curves = String::new();
    for ck in &cks {
        let Some(png) = run_curves(ck)? else { continue };
        let alt = esc(&format!("training curves of {}", ck.display()));
        if cks.len() > 1 {
            writeln!(curves, "<h3>{}</h3>", esc(&ck.display().to_string()))?;
        }
        writeln!(curves, "<img class=\"plot\" alt=\"{alt}\" src=\"{}\">", png_data_uri(&png))?;
    }
    if !curves.is_empty() {
        body.push_str("<h2>Training</h2>\n");
        body.push_str(&curves);
    }
    let path = out.join("report.html");
    let what = match cks.as_slice() {
        [ck] => ck.file_name().unwrap_or_default().to_string_lossy().into_owned(),
        many => format!("an ensemble of {} checkpoints", many.len()),
    };
    let title = format!("unetpp evaluation of {what}");
    crate::fsio::write_atomic(&path, page::page(&title, &body).as_bytes())?;
    Ok(path)
}

fn pm(v: &[f64]) -> Cell {
    let (m, s) = mean_std(v);
    Cell::shown(if v.len() > 1 { format!("{m:.4} ± {s:.4}") } else { format!("{m:.4}") }, m)
}

/// Writes the experiment's `report.html` beside its Markdown report `md`: per model and per run
/// tables, Dice per label, the pruning plot (`md` with `.png`, when `pruning`) and each run's
/// training curves. `dir_of` names a run's directory.
pub fn experiment(
    title: &str,
    results: &[RunResult],
    md: &Path,
    class_names: &[String],
    pruning: bool,
    dir_of: impl Fn(&RunResult) -> PathBuf,
) -> anyhow::Result<PathBuf> {
    let mut body = String::new();
    if let Some(name) = md.file_name() {
        let h = href(Path::new(name));
        writeln!(body, "<p>Also as Markdown: <a href=\"{h}\">{}</a>.</p>", esc(&name.to_string_lossy()))?;
    }
    let mut models: Vec<&str> = vec![];
    for r in results {
        if !models.contains(&r.model.as_str()) {
            models.push(&r.model);
        }
    }
    let metric = |runs: &[&RunResult], f: fn(&crate::infer::Summary) -> f64| {
        pm(&runs.iter().map(|r| f(&r.modes[0])).collect::<Vec<_>>())
    };
    let rows: Vec<Vec<Cell>> = models
        .iter()
        .map(|m| {
            let runs: Vec<&RunResult> = results.iter().filter(|r| r.model == *m).collect();
            let minutes: Vec<f64> = runs.iter().map(|r| r.train_seconds / 60.0).collect();
            vec![
                Cell::text(*m),
                Cell::shown(runs.len().to_string(), runs.len() as f64),
                metric(&runs, |s| s.mean_iou),
                metric(&runs, |s| s.mean_dice),
                Cell::num(mean_std(&minutes).0),
            ]
        })
        .collect();
    let headers = ["model", "runs", "IoU", "Dice", "train minutes per run"].map(String::from).to_vec();
    body.push_str("<h2>Test scores (accurate mode, mean ± std over runs)</h2>\n");
    body.push_str(&table("models", &headers, &rows));

    let mut modes: Vec<String> = vec![];
    for m in results.iter().flat_map(|r| &r.modes) {
        if !modes.contains(&m.mode) {
            modes.push(m.mode.clone());
        }
    }
    let mut headers = ["model", "seed", "fold", "epochs", "best epoch", "train s"].map(String::from).to_vec();
    headers.extend(modes.iter().map(|m| format!("IoU {m}")));
    headers.extend(modes.iter().map(|m| format!("Dice {m}")));
    let rows: Vec<Vec<Cell>> = results
        .iter()
        .map(|r| {
            let mut row = vec![
                Cell::text(&r.model),
                Cell::shown(r.seed.to_string(), r.seed as f64),
                Cell::text(r.fold.clone().unwrap_or_else(|| "–".into())),
                Cell::shown(r.epochs.to_string(), r.epochs as f64),
                Cell::shown(r.best_epoch.to_string(), r.best_epoch as f64),
                Cell::shown(format!("{:.0}", r.train_seconds), r.train_seconds),
            ];
            let find = |m: &String| r.modes.iter().find(|s| &s.mode == m);
            row.extend(modes.iter().map(|m| find(m).map_or(Cell::num(f64::NAN), |s| Cell::num(s.mean_iou))));
            row.extend(modes.iter().map(|m| find(m).map_or(Cell::num(f64::NAN), |s| Cell::num(s.mean_dice))));
            row
        })
        .collect();
    body.push_str("<h2>Per run (every mode from the same checkpoint)</h2>\n");
    body.push_str(&table("runs", &headers, &rows));

    let labels = results.iter().map(|r| r.class_dice.len()).max().unwrap_or(0);
    if labels > 1 {
        let mut headers = vec!["model".to_string()];
        headers.extend((0..labels).map(|c| class_names.get(c).cloned().unwrap_or_else(|| format!("label {}", c + 1))));
        let rows: Vec<Vec<Cell>> = models
            .iter()
            .map(|m| {
                let mut row = vec![Cell::text(*m)];
                row.extend((0..labels).map(|c| {
                    pm(&results
                        .iter()
                        .filter(|r| r.model == *m)
                        .filter_map(|r| r.class_dice.get(c).copied())
                        .collect::<Vec<_>>())
                }));
                row
            })
            .collect();
        body.push_str("<h2>Dice per label (accurate mode)</h2>\n");
        body.push_str(&table("labels", &headers, &rows));
    }
    let plot = md.with_extension("png");
    if pruning && plot.is_file() {
        let png = std::fs::read(&plot).with_context(|| format!("cannot read {}", plot.display()))?;
        body.push_str("<h2>Pruning: accuracy against speed</h2>\n");
        writeln!(body, "<img class=\"plot\" alt=\"pruning trade-off\" src=\"{}\">", png_data_uri(&png))?;
    }
    let mut curves = String::new();
    for r in results {
        let csv = dir_of(r).join("metrics.csv");
        if let Some(png) = csv.is_file().then(|| crate::plot::curves_png(&csv)).transpose()?.flatten() {
            let fold = r.fold.as_ref().map(|f| format!(", test {f}")).unwrap_or_default();
            writeln!(
                curves,
                "<details><summary>{} seed {}{}</summary><img class=\"plot\" alt=\"training curves\" src=\"{}\">\
                 </details>",
                esc(&r.model),
                r.seed,
                esc(&fold),
                png_data_uri(&png)
            )?;
        }
    }
    if !curves.is_empty() {
        body.push_str("<h2>Training curves</h2>\n");
        body.push_str(&curves);
    }
    let path = md.with_extension("html");
    crate::fsio::write_atomic(&path, page::page(title, &body).as_bytes())?;
    Ok(path)
}
