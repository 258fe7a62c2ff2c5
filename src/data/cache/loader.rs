//! The next batches of an epoch, read and augmented on their own thread while the current
//! step runs (as nnU-Net's data loader workers), at most [`AHEAD`] batches ahead. One thread
//! draws from the epoch's seeded generator in the order the training loop did, so the patches
//! and their order are those of the loop itself: a run, and a resumed run, stay exact.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use rand::rngs::StdRng;

use crate::data::patch::{self, Cut, Patch};

/// Batches kept ready: enough for the reader to stay ahead of a step, few enough that memory
/// stays a few batches.
pub const AHEAD: usize = 2;

/// What an epoch's batches are made of.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub steps: usize,
    pub batch: usize,
    pub patch: [usize; 3],
    pub foreground: f64,
}

pub struct Loader {
    rx: Option<Receiver<anyhow::Result<Vec<Patch>>>>,
    thread: Option<JoinHandle<()>>,
}

/// The batches of `plan` drawn from `rng`: a case at random, a patch of it, its augmentation.
fn produce<S: Cut>(cases: &[S], mut rng: StdRng, plan: Plan, tx: SyncSender<anyhow::Result<Vec<Patch>>>) {
    for _ in 0..plan.steps {
        let batch: anyhow::Result<Vec<Patch>> = (0..plan.batch)
            .map(|_| {
                let s = &cases[rand::Rng::random_range(&mut rng, 0..cases.len())];
                let mut p = patch::sample(s, plan.patch, plan.foreground, &mut rng)?;
                patch::augment(&mut p, &mut rng);
                Ok(p)
            })
            .collect();
        let failed = batch.is_err();
        // The receiver gone (the run stopped) or an error sent: nothing more to do.
        if tx.send(batch).is_err() || failed {
            return;
        }
    }
}

impl Loader {
    pub fn start<S: Cut + Send + Sync + 'static>(
        cases: Arc<Vec<S>>,
        rng: StdRng,
        plan: Plan,
    ) -> anyhow::Result<Loader> {
        let (tx, rx) = sync_channel(AHEAD);
        let thread = std::thread::Builder::new()
            .name("unetpp-loader".into())
            .spawn(move || produce(&cases, rng, plan, tx))
            .map_err(|e| anyhow::anyhow!("cannot start the patch loader thread: {e}"))?;
        Ok(Loader { rx: Some(rx), thread: Some(thread) })
    }

    /// The next batch, waiting for it if the reader is behind.
    pub fn next_batch(&mut self) -> anyhow::Result<Vec<Patch>> {
        match self.rx.as_ref().map(|rx| rx.recv()) {
            Some(Ok(batch)) => batch,
            _ => Err(anyhow::anyhow!("the patch loader stopped before the epoch's last batch")),
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the channel first ends a reader waiting to send.
        drop(self.rx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
