//! Lock table micro-benchmarks: the LOCK/UNLOCK pair a writer costs an agent, the
//! READ_TEST_LOCK probe, and contention from two threads on disjoint units.

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use toma_agent::{ClientId, LockTable};

fn locks(c: &mut Criterion) {
    let units = 1 << 16;
    let t = LockTable::new(units);
    let me = ClientId(1);
    let other = ClientId(2);
    let mut g = c.benchmark_group("lock_table");
    g.bench_function("lock+unlock", |b| {
        let mut u = 0u64;
        b.iter(|| {
            u = (u + 7919) % units;
            t.lock(black_box(u), me).expect("free");
            t.unlock(black_box(u), me).expect("held");
        })
    });
    t.lock(5, other).expect("free");
    g.bench_function("held_by_other/probe", |b| {
        let mut u = 0u64;
        b.iter(|| {
            u = (u + 1) % 16;
            black_box(t.held_by_other(black_box(u), me))
        })
    });
    g.bench_function("lock+unlock/2-threads", |b| {
        let shared = Arc::new(LockTable::new(units));
        b.iter_custom(|iters| {
            let start = std::time::Instant::now();
            let hs: Vec<_> = (0..2u64)
                .map(|k| {
                    let s = shared.clone();
                    std::thread::spawn(move || {
                        let c = ClientId(u128::from(k) + 10);
                        for i in 0..iters {
                            let u = (i * 2 + k) % units;
                            s.lock(u, c).expect("free");
                            s.unlock(u, c).expect("held");
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join().expect("thread");
            }
            start.elapsed()
        })
    });
    g.finish();
}

criterion_group!(benches, locks);
criterion_main!(benches);
