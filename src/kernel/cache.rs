//! The weight cache of inference convolutions: weights prepared for their kernel path once per
//! weight tensor and image size, not on every call.

use super::conv::{self, Prepared};
use super::cpu::Geom;
use super::tensors::data;
use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Prepared weights (`conv::prepare`) of inference convolutions, by weight and bias buffer
/// (and shapes): packing them on every call was 5-7% of a batch-1 forward pass. An entry holds
/// clones of both tensors, so while it exists their buffers can be neither freed (and the
/// address reused) nor changed in place (Flex only writes in place into unshared buffers):
/// a hit is the same weights. Entries whose tensors nobody else holds any more are dropped.
pub(super) fn prepared(g: &Geom, w: &FlexTensor, b: &FlexTensor) -> Option<Arc<Prepared>> {
    type Key = (usize, Vec<usize>, usize, usize, [usize; 3]);
    type Cache = Mutex<HashMap<Key, (FlexTensor, FlexTensor, Option<Arc<Prepared>>)>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let key = (data(w).as_ptr() as usize, w.shape().to_vec(), data(b).as_ptr() as usize, data(b).len(), g.sp);
    let cache = CACHE.get_or_init(Default::default);
    if let Some(entry) = cache.lock().expect("weight cache").get(&key) {
        return entry.2.clone();
    }
    let prep = conv::prepare(g, data(w), data(b)).map(Arc::new);
    let mut cache = cache.lock().expect("weight cache");
    cache.retain(|_, (w, b, _)| !w.is_unique() && !b.is_unique());
    // One live model over many image sizes (prepared per size): a few models' worth at most.
    if cache.len() >= 256 {
        cache.clear();
    }
    cache.insert(key, (w.clone(), b.clone(), prep.clone()));
    prep
}
