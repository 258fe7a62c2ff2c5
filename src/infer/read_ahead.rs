//! Reading the next case while the current one is computed: a folder of volumes spends seconds
//! per case decompressing, orienting and normalising, time the kernels would otherwise wait.

use std::sync::mpsc::sync_channel;

/// Calls `each` on `read(item)` for every item in order, reading item k+1 on another thread while
/// `each` works on item k (one case ahead, so at most two cases are held at once). Stops at the
/// first error, from either side, and returns it; the reader stops with it.
pub fn for_each<T, R>(
    items: Vec<T>,
    read: impl Fn(T) -> anyhow::Result<R> + Send,
    mut each: impl FnMut(R) -> anyhow::Result<()>,
) -> anyhow::Result<()>
where
    T: Send,
    R: Send,
{
    let (tx, rx) = sync_channel::<anyhow::Result<R>>(1);
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for item in items {
                let r = read(item);
                let failed = r.is_err();
                // The receiver is gone when `each` failed: stop reading.
                if tx.send(r).is_err() || failed {
                    break;
                }
            }
        });
        // Dropping `rx` on an early return lets a reader blocked in `send` finish.
        for r in rx {
            each(r?)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn keeps_order_and_reads_ahead() {
        let read_count = AtomicUsize::new(0);
        let mut seen = vec![];
        let mut ahead = vec![];
        for_each(
            (0..5).collect(),
            |i: usize| {
                read_count.fetch_add(1, Ordering::SeqCst);
                Ok(i * 10)
            },
            |v| {
                // While item k is processed the reader goes on: item k+1 waits in the channel and
                // k+2 is read (then the reader blocks). Wait for it, up to a generous bound.
                let want = (v / 10 + 3).min(5);
                let start = std::time::Instant::now();
                while read_count.load(Ordering::SeqCst) < want && start.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                std::thread::sleep(Duration::from_millis(5));
                ahead.push(read_count.load(Ordering::SeqCst));
                seen.push(v);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen, [0, 10, 20, 30, 40]);
        // Reads done while item k was processed: k+3 (itself, one waiting in the channel, one
        // blocked in `send`), capped at 5: ahead, and by no more than that.
        assert_eq!(ahead, [3, 4, 5, 5, 5]);
    }

    #[test]
    fn stops_at_the_first_error_of_either_side() {
        let mut seen = vec![];
        let e = for_each(
            (0..5).collect(),
            |i: usize| if i == 2 { anyhow::bail!("cannot read case {i}") } else { Ok(i) },
            |v| {
                seen.push(v);
                Ok(())
            },
        )
        .unwrap_err();
        assert_eq!((e.to_string(), seen), ("cannot read case 2".to_string(), vec![0, 1]));

        let reads = AtomicUsize::new(0);
        let e = for_each(
            (0..100).collect(),
            |i: usize| {
                reads.fetch_add(1, Ordering::SeqCst);
                Ok(i)
            },
            |v| if v == 1 { anyhow::bail!("cannot write case {v}") } else { Ok(()) },
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "cannot write case 1");
        assert!(reads.load(Ordering::SeqCst) <= 4, "the reader stopped soon after");
    }
}
