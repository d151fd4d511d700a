//! A REGISTER carries the client's own list of held locks: a lock the TOMA still has for it
//! that is not on the list (its UNLOCK was lost with a reset connection) is freed.

mod common;

use common::*;
use toma_wire::{Message, Secret};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_register_frees_locks_the_client_no_longer_holds() {
    let (_dir, c) = cluster(2).await;
    let id = volume(&c, 2, 8).await;
    let node = node_of(&c, id, 0).await;
    let me = random_u128();
    let other = random_u128();
    let a = Raw::register(&c, node, id, me).await;
    assert_eq!(a.call(Message::Lock { unit: 0 }).await, Message::Ok);
    assert_eq!(a.call(Message::Lock { unit: 2 }).await, Message::Ok);
    // The connection resets before the UNLOCK of unit 0 arrives; unit 2 is still held.
    a.close();
    a.wait_closed().await;
    let b = Raw::connect(&c, node, id, me).await;
    let secret = Secret(c.volume_record(id).await.expect("volume").secret);
    let g = c.topology(id).await.expect("topology").generation;
    let reply = b
        .call_gen(
            g,
            Message::Register {
                client: me,
                secret,
                held_locks: vec![2],
            },
        )
        .await;
    assert!(matches!(reply, Message::Registered { .. }), "{reply:?}");
    let o = Raw::register(&c, node, id, other).await;
    assert_eq!(
        o.call(Message::Lock { unit: 0 }).await,
        Message::Ok,
        "unit 0 was freed"
    );
    assert_eq!(
        o.call(Message::Lock { unit: 2 }).await,
        Message::Locked { holder: me },
        "unit 2 is still held"
    );
    c.shutdown().await;
}
