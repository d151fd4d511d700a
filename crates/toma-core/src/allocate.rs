//! Where a new volume's members go: distinct nodes, most free space first.

use thiserror::Error;

use crate::layout::Layout;
use crate::topology::{DiskId, NodeId};

/// A disk that could hold a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub disk: DiskId,
    pub node: NodeId,
    /// Largest free extent, in bytes.
    pub free: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AllocateError {
    #[error("not enough capacity: {layout} needs {want} disks with {bytes} bytes free on distinct nodes, found {got}")]
    Capacity {
        layout: Layout,
        want: usize,
        got: usize,
        bytes: u64,
    },
}

/// Picks one disk per member on distinct nodes, preferring the most free space (ties broken
/// by node name, then disk, so the choice is deterministic). `exclude` lists nodes that
/// already serve the volume.
pub fn choose_disks(
    candidates: &[Candidate],
    layout: Layout,
    member_bytes: u64,
    count: usize,
    exclude: &[NodeId],
) -> Result<Vec<(DiskId, NodeId)>, AllocateError> {
    let mut sorted: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.free >= member_bytes && !exclude.contains(&c.node))
        .collect();
    sorted.sort_by(|a, b| {
        b.free
            .cmp(&a.free)
            .then_with(|| a.node.cmp(&b.node))
            .then_with(|| a.disk.cmp(&b.disk))
    });
    let mut chosen: Vec<(DiskId, NodeId)> = Vec::new();
    for c in sorted {
        if chosen.len() == count {
            break;
        }
        if chosen.iter().any(|(_, n)| n == &c.node) {
            continue;
        }
        chosen.push((c.disk, c.node.clone()));
    }
    if chosen.len() < count {
        return Err(AllocateError::Capacity {
            layout,
            want: count,
            got: chosen.len(),
            bytes: member_bytes,
        });
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(d: u128, n: &str, free: u64) -> Candidate {
        Candidate {
            disk: DiskId(d),
            node: n.into(),
            free,
        }
    }

    #[test]
    fn distinct_nodes_most_free_first() {
        let cands = [c(1, "a", 10), c(2, "a", 50), c(3, "b", 20), c(4, "c", 5)];
        let l = Layout::raid1(2).unwrap();
        let got = choose_disks(&cands, l, 8, 2, &[]).unwrap();
        assert_eq!(got, vec![(DiskId(2), "a".into()), (DiskId(3), "b".into())]);
        let e = choose_disks(&cands, l, 8, 3, &[]).unwrap_err();
        assert!(e.to_string().contains("found 2"), "{e}");
        let got = choose_disks(&cands, l, 1, 1, &["a".into(), "b".into()]).unwrap();
        assert_eq!(got, vec![(DiskId(4), "c".into())]);
    }
}
