//! `unetpp._native`: the library's entry points for Python. Arguments are converted, the GIL is
//! released while the library computes, and its errors (the CLI's messages) become
//! `unetpp.UnetppError`. Defaults, checks and docstrings live in the library and in
//! `unetpp/__init__.py`; nothing here decides anything.

use std::path::PathBuf;
use std::sync::Mutex;

use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{IntoPyArray, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use unetpp::app::InferOptions;
use unetpp::backend::Backend;
use unetpp::embed::{Array, Prediction};
use unetpp::model::Mode;

create_exception!(_native, UnetppError, PyValueError, "An error reported by unetpp: bad input, option or file.");

fn error(e: anyhow::Error) -> PyErr {
    UnetppError::new_err(format!("{e:#}"))
}

fn value_error(e: String) -> PyErr {
    UnetppError::new_err(e)
}

fn backend(name: &str) -> PyResult<Backend> {
    name.parse().map_err(value_error)
}

fn options(mode: &str, tile: Option<Vec<usize>>, backend: Backend) -> PyResult<InferOptions> {
    let mode = mode.parse::<Mode>().map_err(value_error)?;
    let tile = match tile.as_deref() {
        None => None,
        Some(&[h, w]) => Some([1, h, w]),
        Some(&[d, h, w]) => Some([d, h, w]),
        Some(t) => return Err(value_error(format!("tile {t:?}: give (height, width) or (depth, height, width)"))),
    };
    Ok(InferOptions { mode: Some(mode), tile, backend, ..Default::default() })
}

/// Labels as (H, W) / (D, H, W) and probabilities as (K, H, W) / (K, D, H, W) numpy arrays,
/// handed over without copying.
type Arrays<'py> = (Bound<'py, PyArrayDyn<u8>>, Option<Bound<'py, PyArrayDyn<f32>>>);

fn to_numpy(py: Python<'_>, p: Prediction, dims: usize, probabilities: bool) -> PyResult<Arrays<'_>> {
    let spatial: Vec<usize> = if dims == 2 { p.shape[1..].to_vec() } else { p.shape.to_vec() };
    let shape_err = |e: numpy::ndarray::ShapeError| value_error(e.to_string());
    let labels = ArrayD::from_shape_vec(IxDyn(&spatial), p.labels).map_err(shape_err)?.into_pyarray(py);
    let probs = if probabilities {
        let shape: Vec<usize> = std::iter::once(p.classes).chain(spatial).collect();
        Some(ArrayD::from_shape_vec(IxDyn(&shape), p.probabilities).map_err(shape_err)?.into_pyarray(py))
    } else {
        None
    };
    Ok((labels, probs))
}

/// A loaded checkpoint (see `unetpp.Model`).
#[pyclass(frozen, module = "unetpp._native")]
struct NativeModel {
    model: Mutex<unetpp::embed::Model>,
    backend: Backend,
    dims: usize,
}

#[pymethods]
impl NativeModel {
    #[new]
    #[pyo3(signature = (path, backend_name = "flex"))]
    fn new(py: Python<'_>, path: PathBuf, backend_name: &str) -> PyResult<Self> {
        let backend = backend(backend_name)?;
        let model = py.detach(|| unetpp::embed::Model::load(&path, backend)).map_err(error)?;
        let dims = model.meta.model.dims;
        Ok(NativeModel { model: Mutex::new(model), backend, dims })
    }

    /// The checkpoint's metadata (architecture, input, epoch) as JSON.
    fn meta_json(&self) -> PyResult<String> {
        serde_json::to_string(&self.lock().meta).map_err(|e| value_error(e.to_string()))
    }

    fn path(&self) -> PathBuf {
        self.lock().path.clone()
    }

    fn modes(&self) -> Vec<String> {
        self.lock().modes().iter().map(Mode::to_string).collect()
    }

    #[pyo3(signature = (array, mode, probabilities, tile = None, spacing = None))]
    fn predict<'py>(
        &self,
        py: Python<'py>,
        array: &Bound<'py, PyUntypedArray>,
        mode: &str,
        probabilities: bool,
        tile: Option<Vec<usize>>,
        spacing: Option<[f64; 3]>,
    ) -> PyResult<Arrays<'py>> {
        let opts = options(mode, tile, self.backend)?;
        macro_rules! by_dtype {
            ($($t:ty => $scale:expr),* $(,)?) => {
                $(if let Ok(a) = array.cast::<PyArrayDyn<$t>>() {
                    let ro = a.try_readonly()?;
                    let view = ro.as_array();
                    let shape = view.shape().to_vec();
                    let p = py.detach(|| {
                        let mut values = view.iter().map(|&v| v as f32);
                        let a = Array { values: &mut values, shape: &shape, full_scale: $scale };
                        self.lock().predict_array(a, &opts, spacing)
                    });
                    return to_numpy(py, p.map_err(error)?, self.dims, probabilities);
                })*
            };
        }
        by_dtype!(
            f32 => 1.0, f64 => 1.0, u8 => 255.0, u16 => 65535.0, i8 => i8::MAX as f32, i16 => i16::MAX as f32,
            u32 => u32::MAX as f32, i32 => i32::MAX as f32, u64 => u64::MAX as f32, i64 => i64::MAX as f32,
        );
        Err(value_error(format!("arrays of dtype {} are not supported: use a float or integer array", array.dtype())))
    }

    #[pyo3(signature = (path, mode, probabilities, tile = None))]
    fn predict_file<'py>(
        &self,
        py: Python<'py>,
        path: PathBuf,
        mode: &str,
        probabilities: bool,
        tile: Option<Vec<usize>>,
    ) -> PyResult<Arrays<'py>> {
        let opts = options(mode, tile, self.backend)?;
        let p = py.detach(|| self.lock().predict_file(&path, &opts)).map_err(error)?;
        to_numpy(py, p, self.dims, probabilities)
    }
}

impl NativeModel {
    fn lock(&self) -> std::sync::MutexGuard<'_, unetpp::embed::Model> {
        // A panic while locked cannot leave the model half-changed: predictions only read it.
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs `go` (without the GIL) with the library's progress bars sent to `progress(kind, number,
/// text)`, when given: `("start", total, label)`, `("update", position, message)`, `("finish", 0, "")`.
fn with_progress<T: Send>(
    py: Python<'_>,
    progress: Option<Py<PyAny>>,
    go: impl FnOnce() -> anyhow::Result<T> + Send,
) -> PyResult<T> {
    py.detach(move || match progress {
        None => go(),
        Some(callback) => unetpp::progress::with_hook(
            move |event| {
                use unetpp::progress::Event;
                let (kind, n, text) = match event {
                    Event::Start { label, total } => ("start", total, label),
                    Event::Update { position, message } => ("update", position, message),
                    Event::Finish => ("finish", 0, String::new()),
                };
                Python::attach(|py| {
                    // A failing progress bar must not stop the work: its error is shown, not raised.
                    if let Err(e) = callback.call1(py, (kind, n, text)) {
                        e.print(py);
                    }
                })
            },
            go,
        ),
    })
    .map_err(error)
}

/// `unetpp predict` into a folder; returns the files written.
#[pyfunction]
#[pyo3(signature = (checkpoint, input, out, mode, probabilities, overwrite, tile = None, backend_name = "flex", progress = None))]
#[allow(clippy::too_many_arguments)]
fn predict_to(
    py: Python<'_>,
    checkpoint: PathBuf,
    input: PathBuf,
    out: PathBuf,
    mode: &str,
    probabilities: Option<&str>,
    overwrite: bool,
    tile: Option<Vec<usize>>,
    backend_name: &str,
    progress: Option<Py<PyAny>>,
) -> PyResult<Vec<PathBuf>> {
    let opts = options(mode, tile, backend(backend_name)?)?;
    let probs = probabilities.map(str::parse::<unetpp::probabilities::Format>).transpose().map_err(value_error)?;
    let p = unetpp::app::PredictOptions { probabilities: probs, overwrite, shard: None };
    with_progress(py, progress, || unetpp::app::predict(&[checkpoint], &input, &out, &opts, &p))
}

/// `unetpp eval`; returns the `summary.json` it wrote.
#[pyfunction]
#[pyo3(signature = (checkpoint, data, out, mode, skip_bad = false, backend_name = "flex", progress = None))]
#[allow(clippy::too_many_arguments)]
fn evaluate(
    py: Python<'_>,
    checkpoint: PathBuf,
    data: PathBuf,
    out: PathBuf,
    mode: &str,
    skip_bad: bool,
    backend_name: &str,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let opts = options(mode, None, backend(backend_name)?)?;
    with_progress(py, progress, || {
        unetpp::app::eval(&[checkpoint], &data, &out, &opts, skip_bad)?;
        let summary = out.join("summary.json");
        std::fs::read_to_string(&summary).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", summary.display()))
    })
}

/// The whole training configuration `settings` (JSON) asks for, as JSON.
#[pyfunction]
fn train_config(py: Python<'_>, settings: &str) -> PyResult<String> {
    let partial: serde_json::Value = serde_json::from_str(settings).map_err(|e| value_error(e.to_string()))?;
    let cfg = py.detach(|| unetpp::embed::train_config(partial)).map_err(error)?;
    serde_json::to_string(&cfg).map_err(|e| value_error(e.to_string()))
}

/// Trains the configuration from `settings` (JSON) or the TOML file `config` into `out` (a new
/// run), or resumes the run in `out` (neither given); `progress(kind, number, text)` receives
/// the bars' events. Returns the run directory.
#[pyfunction]
#[pyo3(signature = (out, settings = None, config = None, progress = None))]
fn train(
    py: Python<'_>,
    out: PathBuf,
    settings: Option<&str>,
    config: Option<PathBuf>,
    progress: Option<Py<PyAny>>,
) -> PyResult<PathBuf> {
    let cfg = match (settings, config) {
        (Some(s), _) => {
            let partial: serde_json::Value = serde_json::from_str(s).map_err(|e| value_error(e.to_string()))?;
            Some(py.detach(|| unetpp::embed::train_config(partial)).map_err(error)?)
        }
        (None, Some(path)) => Some(unetpp::train::TrainConfig::read(&path).map_err(error)?),
        (None, None) => None,
    };
    Ok(with_progress(py, progress, move || unetpp::app::train(cfg, &out))?.dir)
}

/// `unetpp import`: a PyTorch NestedUNet / smp UnetPlusPlus checkpoint file to a unetpp
/// checkpoint; returns the import report.
#[pyfunction]
#[pyo3(signature = (source, out, normalize = None, bilinear = false, backend_name = "flex"))]
fn import_torch(
    py: Python<'_>,
    source: PathBuf,
    out: PathBuf,
    normalize: Option<&str>,
    bilinear: bool,
    backend_name: &str,
) -> PyResult<String> {
    let normalize = normalize.map(str::parse::<unetpp::data::Normalize>).transpose().map_err(value_error)?;
    let backend = backend(backend_name)?;
    let opts = unetpp::import::ImportOptions { bilinear };
    let report = py.detach(|| unetpp::app::import(&source, &out, normalize, opts, backend)).map_err(error)?;
    Ok(report.to_string())
}

/// `unetpp export`.
#[pyfunction]
#[pyo3(signature = (checkpoint, out, format, mode = None, backend_name = "flex"))]
fn export(
    py: Python<'_>,
    checkpoint: PathBuf,
    out: PathBuf,
    format: &str,
    mode: Option<&str>,
    backend_name: &str,
) -> PyResult<()> {
    let format = format.parse::<unetpp::export::Format>().map_err(value_error)?;
    let mode = mode.map(str::parse::<Mode>).transpose().map_err(value_error)?;
    let backend = backend(backend_name)?;
    py.detach(|| unetpp::app::export(&checkpoint, &out, format, mode, backend)).map_err(error)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("UnetppError", m.py().get_type::<UnetppError>())?;
    m.add_class::<NativeModel>()?;
    m.add_function(wrap_pyfunction!(predict_to, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(train_config, m)?)?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(import_torch, m)?)?;
    m.add_function(wrap_pyfunction!(export, m)?)?;
    Ok(())
}
