//! The ring against a real file: concurrent writes and reads land where they should, a
//! dropped request does not disturb the others, and errors name what went wrong.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::Arc;

use toma_io::{AlignedBuf, Ring, ALIGN};

fn pattern(block: u64) -> AlignedBuf {
    let data: Vec<u8> = (0..ALIGN)
        .map(|i| (block as usize * 31 + i * 7) as u8)
        .collect();
    AlignedBuf::copy_of(&data)
}

/// A zeroed file of `blocks` blocks in a new temporary directory (kept while the guard is).
fn disk_file(blocks: u64) -> (tempfile::TempDir, std::path::PathBuf, Arc<std::fs::File>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("disk.img");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("create");
    file.set_len(blocks * ALIGN as u64).expect("size");
    (dir, path, Arc::new(file))
}

/// `path` opened again with O_DIRECT.
fn open_direct(path: &std::path::Path) -> Arc<std::fs::File> {
    Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path)
            .expect("open O_DIRECT"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_and_reads_round_trip() {
    let blocks = 512u64;
    let (_dir, _, file) = disk_file(blocks);
    let ring = Arc::new(Ring::new().expect("io_uring is available here"));

    // 512 writes in flight at once from 8 tasks: more than the ring's depth.
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let (ring, file) = (ring.clone(), file.clone());
        tasks.push(tokio::spawn(async move {
            let writes = (t..blocks).step_by(8).map(|b| {
                let (ring, file) = (ring.clone(), file.clone());
                async move {
                    ring.write_at(&file, pattern(b), b * ALIGN as u64)
                        .await
                        .map_err(|e| format!("block {b}: {e}"))
                }
            });
            futures_join_all(writes).await
        }));
    }
    for t in tasks {
        t.await.expect("task").expect("every write succeeds");
    }
    // What the ring wrote, read back by plain pread.
    for b in [0, 1, 255, 511] {
        let mut back = vec![0u8; ALIGN];
        file.read_exact_at(&mut back, b * ALIGN as u64)
            .expect("pread");
        assert_eq!(back[..], pattern(b)[..], "block {b} as written by the ring");
    }
    // And read back through the ring, a multi-block read among them.
    for b in 0..blocks {
        let got = ring
            .read_at(&file, AlignedBuf::zeroed(ALIGN), b * ALIGN as u64)
            .await
            .expect("read");
        assert_eq!(got[..], pattern(b)[..], "block {b} read through the ring");
    }
    let two = ring
        .read_at(&file, AlignedBuf::zeroed(2 * ALIGN), 10 * ALIGN as u64)
        .await
        .expect("two-block read");
    assert_eq!(two[..ALIGN], pattern(10)[..]);
    assert_eq!(two[ALIGN..], pattern(11)[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_past_the_end_fails_and_a_dropped_request_harms_nothing() {
    let (_dir, path, file) = disk_file(4);
    let ring = Ring::new().expect("io_uring is available here");

    let e = ring
        .read_at(&file, AlignedBuf::zeroed(2 * ALIGN), 3 * ALIGN as u64)
        .await
        .expect_err("half of it is past the end");
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    assert!(e.to_string().contains("4096 of 8192"), "{e}");

    // A write whose future is dropped right after it was submitted still lands whole (the
    // ring kept its buffer), and the ring goes on serving.
    {
        let fut = ring.write_at(&file, pattern(2), 2 * ALIGN as u64);
        let mut fut = Box::pin(fut);
        let _ = futures_poll_once(fut.as_mut()).await;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let got = ring
            .read_at(&file, AlignedBuf::zeroed(ALIGN), 2 * ALIGN as u64)
            .await
            .expect("read");
        if got[..] == pattern(2)[..] {
            break;
        }
        assert!(
            got.iter().all(|&b| b == 0),
            "a torn block: neither old nor new"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the dropped write never landed"
        );
        tokio::task::yield_now().await;
    }

    // A file descriptor that is not open for writing: the error comes back, named.
    let ro = Arc::new(std::fs::File::open(&path).expect("open read-only"));
    let e = ring
        .write_at(&ro, pattern(0), 0)
        .await
        .expect_err("read-only descriptor");
    assert_eq!(e.raw_os_error(), Some(9), "EBADF: {e}");
}

/// Polls `fut` once (submitting its request) and gives up on it.
async fn futures_poll_once<F: std::future::Future + Unpin>(mut fut: F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut fut).poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

/// Runs every future concurrently on this task; the first error, if any.
async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Result<(), String>
where
    F: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for f in futs {
        set.spawn(f);
    }
    while let Some(r) = set.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// More requests in flight than the completion queue holds (the kernel keeps the rest in
/// its overflow list): every one completes, with no request after them to flush the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_requests_in_flight_than_the_completion_queue_holds() {
    let blocks = 4096u64;
    let (_dir, path, _) = disk_file(blocks);
    // O_DIRECT, so that completions arrive later from the device, not during the submit.
    let file = open_direct(&path);
    let ring = Arc::new(Ring::new().expect("io_uring is available here"));
    let writes = (0..blocks).map(|b| {
        let (ring, file) = (ring.clone(), file.clone());
        async move {
            ring.write_at(&file, pattern(b), b * ALIGN as u64)
                .await
                .map_err(|e| format!("block {b}: {e}"))
        }
    });
    tokio::time::timeout(
        std::time::Duration::from_secs(120),
        futures_join_all(writes),
    )
    .await
    .expect("every write completes (none is left in the kernel's overflow list)")
    .expect("every write succeeds");
    for b in [0, blocks / 2, blocks - 1] {
        let got = ring
            .read_at(&file, AlignedBuf::zeroed(ALIGN), b * ALIGN as u64)
            .await
            .expect("read");
        assert_eq!(got[..], pattern(b)[..], "block {b}");
    }
}

/// Bytes that start at an aligned address go to an `O_DIRECT` write as they are (no copy),
/// others are copied; a borrowed buffer written to becomes a copy, and the bytes it came from
/// stay as they were.
#[tokio::test]
async fn aligned_bytes_are_written_without_a_copy() {
    let (_dir, path, _) = disk_file(4);
    let file = open_direct(&path);
    let ring = Ring::new().expect("io_uring is available here");
    let aligned = pattern(1).into_bytes();
    assert_eq!(aligned.as_ptr().align_offset(ALIGN), 0);
    let buf = AlignedBuf::from_bytes(aligned.clone());
    assert!(buf.is_borrowed_bytes());
    assert_eq!(buf[..].as_ptr(), aligned.as_ptr());
    ring.write_at(&file, buf, ALIGN as u64)
        .await
        .expect("an O_DIRECT write from borrowed bytes");
    let back = ring
        .read_at(&file, AlignedBuf::zeroed(ALIGN), ALIGN as u64)
        .await
        .expect("read");
    assert_eq!(back[..], aligned[..]);

    // Not aligned: copied into an aligned buffer, same bytes.
    let mut two = pattern(2).to_vec();
    two.insert(0, 0xEE);
    let unaligned = bytes::Bytes::from(two).slice(1..);
    let copy = AlignedBuf::from_bytes(unaligned.clone());
    assert!(!copy.is_borrowed_bytes());
    assert_eq!(copy[..], unaligned[..]);
    ring.write_at(&file, copy, 2 * ALIGN as u64)
        .await
        .expect("an O_DIRECT write from the copy");

    // Written to, a borrowed buffer becomes a copy of its own.
    let mut mine = AlignedBuf::from_bytes(aligned.clone());
    mine[0] ^= 0xFF;
    assert!(!mine.is_borrowed_bytes());
    assert_ne!(mine[0], aligned[0]);
    assert_eq!(aligned[..], pattern(1)[..]);
}
