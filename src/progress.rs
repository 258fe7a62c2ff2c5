//! Progress of training, prediction and evaluation: indicatif's bar on a terminal (it draws nothing elsewhere), or, on a thread
//! where a program embedding the library has set a hook, events to that hook instead (the Python
//! package turns them into tqdm bars, which also render in a notebook).

use std::cell::RefCell;
use std::rc::Rc;

use indicatif::{ProgressBar, ProgressStyle};

/// What a bar reports: `Start` with the bar's label (`epoch 3/10`, `predict`, `eval`) and length, `Update` with the position and
/// the latest message, `Finish`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Start { label: String, total: u64 },
    Update { position: u64, message: String },
    Finish,
}

type Hook = Rc<dyn Fn(Event)>;

thread_local! {
    static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
}

/// Runs `f` with progress on this thread sent to `hook`; the previous hook is back afterwards.
pub fn with_hook<T>(hook: impl Fn(Event) + 'static, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Hook>);
    impl Drop for Restore {
        fn drop(&mut self) {
            HOOK.with(|h| *h.borrow_mut() = self.0.take());
        }
    }
    let _restore = Restore(HOOK.with(|h| h.borrow_mut().replace(Rc::new(hook))));
    f()
}

/// One bar of `total` steps: the thread's hook's, else a terminal bar.
pub struct Bar {
    hook: Option<Hook>,
    term: ProgressBar,
    message: RefCell<String>,
}

impl Bar {
    /// A training epoch's bar of `total` steps; `label` is `EPOCH/EPOCHS`.
    pub fn new(label: String, total: u64) -> Bar {
        Bar::items(format!("epoch {label}"), total)
    }

    /// A bar of `total` items (steps, cases) labelled `label`.
    pub fn items(label: impl Into<String>, total: u64) -> Bar {
        let label = label.into();
        let hook = HOOK.with(|h| h.borrow().clone());
        let term = if hook.is_some() { ProgressBar::hidden() } else { ProgressBar::new(total) };
        term.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                .unwrap()
                .progress_chars("=> "),
        );
        term.set_prefix(label.clone());
        if let Some(h) = &hook {
            h(Event::Start { label, total });
        }
        Bar { hook, term, message: RefCell::new(String::new()) }
    }

    fn update(&self) {
        if let Some(h) = &self.hook {
            h(Event::Update { position: self.term.position(), message: self.message.borrow().clone() });
        }
    }

    pub fn inc(&self, n: u64) {
        self.term.inc(n);
        self.update();
    }

    pub fn set_message(&self, message: String) {
        self.term.set_message(message.clone());
        *self.message.borrow_mut() = message;
        self.update();
    }

    /// Prints a line to stderr above the bar (a hidden bar prints it too).
    pub fn println(&self, line: impl std::fmt::Display) {
        self.term.suspend(|| eprintln!("{line}"));
    }

    pub fn finish_and_clear(&self) {
        self.term.finish_and_clear();
        if let Some(h) = &self.hook {
            h(Event::Finish);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hook_gets_the_events_on_its_thread_only() {
        let seen = Rc::new(RefCell::new(vec![]));
        let s = seen.clone();
        with_hook(
            move |e| s.borrow_mut().push(e),
            || {
                let bar = Bar::new("1/2".into(), 3);
                bar.inc(1);
                bar.set_message("loss 0.5".into());
                bar.finish_and_clear();
                // Another thread has no hook: its bar reports nothing here.
                std::thread::spawn(|| Bar::new("x".into(), 1).inc(1)).join().unwrap();
            },
        );
        Bar::new("after".into(), 1).inc(1);
        let update = |position: u64, message: &str| Event::Update { position, message: message.into() };
        assert_eq!(
            *seen.borrow(),
            vec![
                Event::Start { label: "epoch 1/2".into(), total: 3 },
                update(1, ""),
                update(1, "loss 0.5"),
                Event::Finish
            ]
        );
    }
}
