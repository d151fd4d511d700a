//! An agent refuses to start on a disk path that does not exist, is too small, or is in use
//! by another (running) agent — with an error naming the path — and the cluster, including
//! the agent whose disk it tried to take, carries on untouched.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_disk_paths_are_refused_naming_the_path() {
    let (dir, mut c) = cluster(2).await;
    let id = volume(&c, 2, 16).await;
    let cl = client(&c, id).await;
    cl.write(0, block(0, 1)).await.unwrap();

    // Does not exist.
    let missing = dir.path().join("extra").join("no-such-disk.img");
    let e = c
        .add_node_with_disks(vec![missing.clone()])
        .await
        .expect_err("a missing disk is refused");
    let msg = e.to_string();
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
    assert!(msg.contains("does not exist"), "{msg}");
    assert_eq!(c.node_count(), 2, "no node added");

    // Too small (less than the superblock area plus one extent).
    let small = dir.path().join("small.img");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(MIB + 4096)
        .unwrap();
    let e = c
        .add_node_with_disks(vec![small.clone()])
        .await
        .expect_err("a small disk is refused");
    let msg = e.to_string();
    assert!(msg.contains(&small.display().to_string()), "{msg}");
    assert!(msg.contains("too small"), "{msg}");
    assert_eq!(std::fs::metadata(&small).unwrap().len(), MIB + 4096);
    assert!(
        std::fs::read(&small).unwrap().iter().all(|&b| b == 0),
        "nothing written to the refused disk"
    );

    // In use by node 0's running agent.
    let taken = c.disk_paths(0)[0].clone();
    let before = std::fs::read(&taken).unwrap();
    let e = c
        .add_node_with_disks(vec![taken.clone()])
        .await
        .expect_err("a disk in use is refused");
    let msg = e.to_string();
    assert!(msg.contains(&taken.display().to_string()), "{msg}");
    assert!(msg.contains("in use by another agent"), "{msg}");
    assert_eq!(c.node_count(), 2, "no node added");

    // Nothing changed on the taken disk, and its agent still serves.
    assert_eq!(std::fs::read(&taken).unwrap(), before);
    cl.write(CHUNK, block(1, 1)).await.unwrap();
    assert_eq!(cl.read(0, CHUNK as usize).await.unwrap(), block(0, 1));
    assert_eq!(cl.read(CHUNK, CHUNK as usize).await.unwrap(), block(1, 1));
    c.assert_mirrors_identical(id).await;

    // A good disk is accepted after all of that.
    let ok = c
        .add_node(1, 64 * MIB)
        .await
        .expect("a good disk is accepted");
    assert_eq!(ok, 2);
    assert!(c.agent(ok).is_some());
    c.shutdown().await;
}
