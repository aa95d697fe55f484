//! `retinaface_rs`: the retinaface engine from Python. Images are NumPy arrays as `cv2.imread` returns
//! them (H×W×3 uint8 BGR; H×W×4 drops alpha), detections are the command line's JSON objects, and the
//! raw outputs are float32 arrays in the reference's layout, so one process can compare the engine with a
//! PyTorch model. The GIL is released while the engine computes; an `Engine` may be shared by threads.

use numpy::{PyArray1, PyArrayDescrMethods, PyArrayMethods, PyReadonlyArray3, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use retinaface::image_io::{self, DecodeLimits, ResizeMode};
use retinaface::post::anchors;
use retinaface::{Backend, BgrImage, DetectOptions, Detection, Error, Network, PostOptions, WeightsSpec};
use std::path::PathBuf;
use std::sync::Arc;

/// The engine's errors as the Python exceptions a caller would catch: a missing file is
/// FileNotFoundError, other I/O OSError, a CUDA failure RuntimeError, everything else (bad weights,
/// arguments, images) ValueError; the message is the command line's.
fn py_err(e: Error) -> PyErr {
    let msg = e.to_string();
    match &e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
        Error::Io { .. } => PyOSError::new_err(msg),
        Error::Cuda(_) => PyRuntimeError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

/// A uint8 H×W×3 (BGR) or H×W×4 (BGRA, alpha dropped) array of any strides, copied into the engine's
/// contiguous BGR image.
fn to_image(obj: &Bound<'_, PyAny>) -> PyResult<BgrImage> {
    let arr = obj.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!(
            "image must be a numpy.ndarray of uint8, H×W×3 BGR as cv2.imread returns, not {}",
            obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "this type".into())
        ))
    })?;
    let dtype = arr.dtype();
    if !dtype.is_equiv_to(&numpy::dtype::<u8>(obj.py())) {
        return Err(PyTypeError::new_err(format!("image must have dtype uint8, found {dtype}")));
    }
    let shape = arr.shape().to_vec();
    if shape.len() != 3 || !(shape[2] == 3 || shape[2] == 4) {
        return Err(PyValueError::new_err(format!("image must be H×W×3 (BGR) or H×W×4 (BGRA), found shape {shape:?}")));
    }
    let (h, w) = (shape[0], shape[1]);
    if h == 0 || w == 0 {
        return Err(PyValueError::new_err(format!("image is empty ({w}x{h})")));
    }
    let typed: PyReadonlyArray3<'_, u8> = obj.extract()?;
    let view = typed.as_array();
    let data = match view.as_slice() {
        Some(s) if shape[2] == 3 => s.to_vec(),
        _ => {
            let mut data = Vec::with_capacity(h * w * 3);
            for y in 0..h {
                for x in 0..w {
                    data.extend_from_slice(&[view[[y, x, 0]], view[[y, x, 1]], view[[y, x, 2]]]);
                }
            }
            data
        }
    };
    BgrImage::new(w, h, data).map_err(py_err)
}

/// The exact value of each f32 as a Python float: the numbers `retinaface detect --json` prints.
fn detection_dict<'py>(py: Python<'py>, d: &Detection) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("box", d.bbox.iter().map(|&v| v as f64).collect::<Vec<_>>())?;
    dict.set_item("score", d.score as f64)?;
    dict.set_item("landmarks", d.landmarks.iter().map(|&v| v as f64).collect::<Vec<_>>())?;
    Ok(dict)
}

fn detections_list<'py>(py: Python<'py>, dets: &[Detection]) -> PyResult<Bound<'py, PyList>> {
    let items = dets.iter().map(|d| detection_dict(py, d)).collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, items)
}

/// A RetinaFace detector: the network built from weights (a .pth checkpoint of either layout, or the
/// engine's safetensors) or from the synthetic recipe, on a backend (`cpu`, `cuda`, `auto`, `cuda-sim`).
#[pyclass(frozen, module = "retinaface_rs")]
struct Engine {
    inner: Arc<retinaface::Engine>,
    backend: String,
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (weights=None, *, network=None, backend="auto", synthetic_seed=None, precision=None))]
    fn new(
        py: Python<'_>,
        weights: Option<PathBuf>,
        network: Option<&str>,
        backend: &str,
        synthetic_seed: Option<u64>,
        precision: Option<&str>,
    ) -> PyResult<Self> {
        let network = network.map(str::parse::<Network>).transpose().map_err(py_err)?;
        let spec = match (weights, synthetic_seed) {
            (Some(p), None) => WeightsSpec::File(p),
            (None, Some(seed)) => WeightsSpec::Synthetic { seed },
            (Some(_), Some(_)) => return Err(PyValueError::new_err("give weights or synthetic_seed, not both")),
            (None, None) => return Err(PyValueError::new_err("give weights=PATH or synthetic_seed=S")),
        };
        match precision {
            None | Some("f32") => {}
            Some(other) => {
                return Err(PyValueError::new_err(format!(
                    "precision `{other}`: this build computes in f32 only (expected None or \"f32\")"
                )));
            }
        }
        let choice = backend.parse::<Backend>().map_err(py_err)?;
        let (inner, line) = py
            .detach(move || -> retinaface::Result<_> {
                let mut engine = retinaface::Engine::new(&spec, network)?;
                let line = engine.set_backend(choice)?;
                Ok((engine, line))
            })
            .map_err(py_err)?;
        Ok(Engine { inner: Arc::new(inner), backend: line })
    }

    /// The network's name, e.g. "mobilenetv1_0.25".
    #[getter]
    fn network(&self) -> &'static str {
        self.inner.network().name()
    }

    /// What runs the network, as the command line reports it.
    #[getter]
    fn backend(&self) -> String {
        self.backend.clone()
    }

    /// Detections of one image, best first, in its own pixels: a list of
    /// `{"box": [x1, y1, x2, y2], "score": s, "landmarks": [x0, y0, …, x4, y4]}`.
    #[pyo3(signature = (image, *, conf_threshold=0.02, nms_threshold=0.4, pre_nms_topk=5000, post_nms_topk=750, resize="original"))]
    #[allow(clippy::too_many_arguments)] // one per keyword of the Python signature
    fn detect<'py>(
        &self,
        py: Python<'py>,
        image: &Bound<'py, PyAny>,
        conf_threshold: f32,
        nms_threshold: f32,
        pre_nms_topk: usize,
        post_nms_topk: usize,
        resize: &str,
    ) -> PyResult<Bound<'py, PyList>> {
        let opts = options(conf_threshold, nms_threshold, pre_nms_topk, post_nms_topk, resize)?;
        let img = to_image(image)?;
        let engine = Arc::clone(&self.inner);
        let dets = py.detach(move || engine.detect(&img, &opts)).map_err(py_err)?;
        detections_list(py, &dets)
    }

    /// `detect` of each image of a sequence; images of equal size share a forward pass.
    #[pyo3(signature = (images, *, conf_threshold=0.02, nms_threshold=0.4, pre_nms_topk=5000, post_nms_topk=750, resize="original"))]
    #[allow(clippy::too_many_arguments)] // one per keyword of the Python signature
    fn detect_batch<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        conf_threshold: f32,
        nms_threshold: f32,
        pre_nms_topk: usize,
        post_nms_topk: usize,
        resize: &str,
    ) -> PyResult<Bound<'py, PyList>> {
        let opts = options(conf_threshold, nms_threshold, pre_nms_topk, post_nms_topk, resize)?;
        let imgs = images
            .try_iter()
            .map_err(|_| PyTypeError::new_err("images must be a sequence of uint8 arrays"))?
            .enumerate()
            .map(|(i, item)| {
                to_image(&item?).map_err(|e| {
                    let msg = format!("images[{i}]: {}", e.value(py));
                    if e.is_instance_of::<PyTypeError>(py) {
                        PyTypeError::new_err(msg)
                    } else {
                        PyValueError::new_err(msg)
                    }
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        let engine = Arc::clone(&self.inner);
        let all = py.detach(move || engine.detect_batch(&imgs, &opts, None)).map_err(py_err)?;
        let lists = all.iter().map(|d| detections_list(py, d)).collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, lists)
    }

    /// The raw outputs of one image at its own size: float32 `loc` [A, 4], `conf` [A, 2] (softmaxed),
    /// `landmarks` [A, 10] and `priors` [A, 4], in the reference's anchor order.
    fn forward<'py>(&self, py: Python<'py>, image: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
        let img = to_image(image)?;
        let engine = Arc::clone(&self.inner);
        let (raw, priors) = py
            .detach(move || -> retinaface::Result<_> {
                let raw = engine
                    .forward(&[&img])?
                    .pop()
                    .ok_or_else(|| Error::InvalidArgument("the forward pass returned no output".into()))?;
                Ok((raw, anchors::priors(img.height, img.width)))
            })
            .map_err(py_err)?;
        let a = raw.conf.len() / 2;
        let out = PyDict::new(py);
        out.set_item("loc", PyArray1::from_vec(py, raw.loc).reshape([a, 4])?)?;
        out.set_item("conf", PyArray1::from_vec(py, raw.conf).reshape([a, 2])?)?;
        out.set_item("landmarks", PyArray1::from_vec(py, raw.landmarks).reshape([a, 10])?)?;
        out.set_item("priors", PyArray1::from_vec(py, priors).reshape([a, 4])?)?;
        Ok(out)
    }

    fn __repr__(&self) -> String {
        format!("Engine(network={:?}, {})", self.inner.network().name(), self.backend)
    }
}

fn options(conf: f32, nms: f32, pre: usize, post: usize, resize: &str) -> PyResult<DetectOptions> {
    let opts = DetectOptions {
        post: PostOptions {
            conf_threshold: conf,
            nms_threshold: nms,
            pre_nms_topk: Some(pre),
            post_nms_topk: Some(post),
        },
        resize: resize.parse::<ResizeMode>().map_err(py_err)?,
    };
    opts.post.validate().map_err(py_err)?;
    Ok(opts)
}

/// The face crop aligned to the ArcFace five-point template, as insightface's `norm_crop`: a
/// size×size×3 uint8 array. `landmarks` is the 10 numbers `detect` returns or a 5×2 array.
#[pyfunction]
#[pyo3(signature = (image, landmarks, size=112))]
fn align<'py>(
    py: Python<'py>,
    image: &Bound<'py, PyAny>,
    landmarks: &Bound<'py, PyAny>,
    size: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let img = to_image(image)?;
    let np = py.import("numpy")?;
    let flat = np
        .call_method1("asarray", (landmarks, "float64"))
        .map_err(|e| PyTypeError::new_err(format!("landmarks must be 10 numbers or a 5×2 array: {}", e.value(py))))?
        .call_method1("reshape", (-1,))?;
    let values: Vec<f64> = flat.call_method0("tolist")?.extract()?;
    let pts: [f32; 10] =
        values.iter().map(|&v| v as f32).collect::<Vec<_>>().try_into().map_err(|v: Vec<f32>| {
            PyValueError::new_err(format!("landmarks must hold 10 numbers, found {}", v.len()))
        })?;
    let crop = py.detach(move || retinaface::align::norm_crop(&img, &pts, size)).map_err(py_err)?;
    image_array(py, crop)
}

fn image_array(py: Python<'_>, img: BgrImage) -> PyResult<Bound<'_, PyAny>> {
    Ok(PyArray1::from_vec(py, img.data).reshape([img.height, img.width, 3])?.into_any())
}

/// A JPEG or PNG file decoded by the engine's own decoder (as `retinaface detect` reads it: EXIF
/// orientation applied, grey and alpha handled as `cv2.imread`): an H×W×3 uint8 BGR array.
#[pyfunction]
fn imread(py: Python<'_>, path: PathBuf) -> PyResult<Bound<'_, PyAny>> {
    let img = py.detach(|| image_io::load(&path, &DecodeLimits::default())).map_err(py_err)?;
    image_array(py, img)
}

/// `imread` of encoded bytes; `name` names the input in error messages.
#[pyfunction]
#[pyo3(signature = (data, name="bytes"))]
fn decode<'py>(py: Python<'py>, data: &[u8], name: &str) -> PyResult<Bound<'py, PyAny>> {
    let bytes = data.to_vec();
    let name = name.to_string();
    let img = py.detach(move || image_io::decode(&bytes, &name, &DecodeLimits::default())).map_err(py_err)?;
    image_array(py, img)
}

#[pymodule]
fn retinaface_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_function(wrap_pyfunction!(align, m)?)?;
    m.add_function(wrap_pyfunction!(imread, m)?)?;
    m.add_function(wrap_pyfunction!(decode, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
