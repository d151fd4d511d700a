//! RAID6 reads, writes and stripe copies (the lock unit is the stripe: k data chunks + P + Q,
//! rotated across the members by `toma_core::placement`).
//!
//! - A read takes data chunks from their members when those are RWL, one READ each and no
//!   lock test (a data chunk has one copy, which stale-lock recovery and the rebuild keep);
//!   otherwise it takes the stripe's locks and reconstructs from k RWL members' columns.
//! - A write, under the stripe's locks (and dirty bits when a member is DEAD), reads the old
//!   columns of the data chunks it does not cover, computes P and Q of the touched columns
//!   (4 KiB-aligned) and writes the touched data chunks, P and Q to every non-DEAD member
//!   holding them. A write covering whole chunks reads nothing ("full-stripe write").
//! - A stripe copy (rebuild, stale-lock recovery) reads every data chunk (reconstructing
//!   when needed), re-encodes P and Q and writes each target member its shard.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;
use toma_core::placement::{
    clears_dirty_after, locks, needs_intent, raid6_data_member, raid6_shard_of, raid6_sources,
    read_member, sets_dirty, write_members,
};
use toma_core::{DirtyMarks, DiskId, MemberIdx, Role, Topology};
use toma_wire::Message;

use super::{Backoff, Inner, Retry};
use crate::error::ClientError;
use crate::raid6::{align_columns, encode, reconstruct};
use crate::range::UnitPart;

/// The old columns a write read, kept for its next attempt: a write that reached some
/// members and not others (a member died, a TOMA was behind) is redone from the same old
/// bytes — read again, they could be a mix of its own first attempt and the old stripe,
/// which reconstructs into garbage when a data member is missing. Valid only while the
/// writer held the stripe's locks without a break.
#[derive(Default)]
pub(super) struct OldColumns {
    cols: Option<(Columns, Vec<Option<Bytes>>)>,
    /// Some attempt of the write sent shards: its locks are kept until it is done (or the
    /// client is fenced and stale-lock recovery takes over).
    wrote: bool,
}

/// An in-chunk byte range `[from, to)` of every chunk of a stripe.
type Columns = (u64, u64);

impl OldColumns {
    /// The write starts over (its client was fenced: recovery took its stripe over).
    pub(super) fn forget(&mut self) {
        *self = OldColumns::default();
    }
}

/// Where a request lands in its stripe.
struct Span {
    stripe: u64,
    k: usize,
    chunk: u64,
    /// Byte range in the stripe's data, `[lo, hi)`.
    lo: u64,
    hi: u64,
}

impl Span {
    fn new(t: &Topology, p: &UnitPart) -> Span {
        let k = t.layout.min_readable();
        let chunk = u64::from(t.chunk_size);
        let stripe = p.unit;
        let lo = p.offset - stripe * chunk * k as u64;
        Span {
            stripe,
            k,
            chunk,
            lo,
            hi: lo + u64::from(p.len),
        }
    }

    /// The data chunks the request touches.
    fn chunks(&self) -> std::ops::RangeInclusive<usize> {
        (self.lo / self.chunk) as usize..=((self.hi - 1) / self.chunk) as usize
    }

    /// `[from, to)` of chunk `j` the request covers (in-chunk offsets); empty if none.
    fn in_chunk(&self, j: usize) -> (u64, u64) {
        let start = j as u64 * self.chunk;
        let from = self.lo.max(start);
        let to = self.hi.min(start + self.chunk);
        if from >= to {
            (0, 0)
        } else {
            (from - start, to - start)
        }
    }

    /// The columns (in-chunk range, block-aligned) that hold every touched byte.
    fn columns(&self) -> (u64, u64) {
        let r = self.chunks();
        if r.start() == r.end() {
            let (a, b) = self.in_chunk(*r.start());
            align_columns(a, b, self.chunk)
        } else {
            (0, self.chunk)
        }
    }

    /// Offset of this stripe's chunks in every member's extent.
    fn base(&self) -> u64 {
        self.stripe * self.chunk
    }
}

impl Inner {
    /// Bytes `[offset, offset + len)` of member `m`'s extent.
    async fn read_member(
        self: &Arc<Self>,
        t: &Arc<Topology>,
        m: MemberIdx,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, Retry> {
        let len32 = u32::try_from(len)
            .map_err(|_| Retry::Fatal(ClientError::Protocol(format!("read of {len} bytes"))))?;
        match self
            .call(t, m, Message::Read { offset, len: len32 })
            .await?
        {
            Message::Data { data } if data.len() as u64 == len => Ok(data),
            other => Err(Retry::Fatal(ClientError::Protocol(format!(
                "member {m} answered READ with {:?}",
                other.kind()
            )))),
        }
    }

    /// Columns `[ca, cb)` of the data chunks `need` of stripe `s` (the others `None`): from
    /// their members when all of those are RWL, otherwise reconstructed from k RWL members
    /// (then every chunk is returned).
    async fn stripe_columns(
        self: &Arc<Self>,
        t: &Arc<Topology>,
        sp: &Span,
        (ca, cb): (u64, u64),
        need: &[usize],
    ) -> Result<Vec<Option<Bytes>>, Retry> {
        let s = sp.stripe;
        let mut out = vec![None; sp.k];
        let direct = need
            .iter()
            .all(|&j| t.members[raid6_data_member(t, s, j)].role == Role::Rwl);
        if direct {
            let reads = join_all(need.iter().map(|&j| {
                self.read_member(t, raid6_data_member(t, s, j), sp.base() + ca, cb - ca)
            }))
            .await;
            for (&j, r) in need.iter().zip(reads) {
                out[j] = Some(r?);
            }
            return Ok(out);
        }
        let Some(sources) = raid6_sources(t, s) else {
            // Fewer than k readable members: wait for the volume to come back.
            return Err(Retry::Topology);
        };
        let reads = join_all(
            sources
                .iter()
                .map(|&m| self.read_member(t, m, sp.base() + ca, cb - ca)),
        )
        .await;
        let mut shards = Vec::with_capacity(sp.k);
        for (&m, r) in sources.iter().zip(reads) {
            shards.push((raid6_shard_of(t, s, m), r?));
        }
        let data = reconstruct(sp.k, &shards).map_err(Retry::Fatal)?;
        for (j, d) in data.into_iter().enumerate() {
            out[j] = Some(d);
        }
        Ok(out)
    }

    pub(super) async fn read_stripe(self: &Arc<Self>, p: UnitPart) -> Result<Bytes, ClientError> {
        let mut backoff = Backoff::new();
        loop {
            let (t, guard) = self.begin_io();
            let res = self.try_read_stripe(&t, &p).await;
            drop(guard);
            match res {
                Ok(data) => return Ok(data),
                Err(Retry::Topology) => self.wait_newer(t.generation, self.cfg.hold_retry).await,
                Err(Retry::Backoff) | Err(Retry::Fenced) => backoff.wait().await,
                Err(Retry::Fatal(e)) => return Err(e),
            }
        }
    }

    /// One attempt.
    ///
    /// A data chunk on an RWL member is read with a plain READ and no lock test. A data chunk
    /// has one copy: stale-lock recovery and the rebuild re-encode P and Q from it and never
    /// change it. A read that overlaps a write may return the write's new bytes; they are
    /// undone only if that writer crashes and the data member is lost before P and Q were
    /// written, and then the write was never acknowledged (P2 does not cover it). Checked by
    /// `toma check-model --raid raid6`.
    async fn try_read_stripe(
        self: &Arc<Self>,
        t: &Arc<Topology>,
        p: &UnitPart,
    ) -> Result<Bytes, Retry> {
        let sp = Span::new(t, p);
        let s = sp.stripe;
        if read_member(t, s).is_none() {
            // Failed: fewer than k readable members.
            return Err(Retry::Topology);
        }
        let chunks = sp.chunks();
        let direct = chunks
            .clone()
            .all(|j| t.members[raid6_data_member(t, s, j)].role == Role::Rwl);
        let mut out = BytesMut::with_capacity(p.len as usize);
        if direct {
            let reads = join_all(chunks.clone().map(|j| {
                let (a, b) = sp.in_chunk(j);
                self.read_member(t, raid6_data_member(t, s, j), sp.base() + a, b - a)
            }))
            .await;
            for r in reads {
                out.extend_from_slice(&r?);
            }
            return Ok(out.freeze());
        }
        // A read that decodes several members' shards takes the stripe's locks, like a
        // writer: a write could reach one member before these reads and another after, and
        // be done before a test after the read (found by the model checker), and mixed
        // shards decode into bytes no write wrote.
        let _local = self.local_locks.lock(s).await;
        let lock_set = locks(t, s);
        if lock_set.is_empty() {
            return Err(Retry::Topology);
        }
        let mut held = BTreeSet::new();
        let res: Result<(), Retry> = async {
            self.take_locks(t, s, &lock_set, &mut held, true).await?;
            let cols = sp.columns();
            let need: Vec<usize> = chunks.clone().collect();
            let data = self.stripe_columns(t, &sp, cols, &need).await?;
            for j in chunks {
                let (a, b) = sp.in_chunk(j);
                let d = data[j].as_ref().ok_or_else(|| {
                    Retry::Fatal(ClientError::Protocol(format!("RAID6 chunk {j} not read")))
                })?;
                out.extend_from_slice(&d[(a - cols.0) as usize..(b - cols.0) as usize]);
            }
            Ok(())
        }
        .await;
        self.unlock_all(t, s, &mut held).await;
        res?;
        Ok(out.freeze())
    }

    pub(super) async fn try_write_stripe(
        self: &Arc<Self>,
        t: &Arc<Topology>,
        p: UnitPart,
        data: &Bytes,
        held: &mut BTreeSet<DiskId>,
        cache: &mut OldColumns,
    ) -> Result<(), Retry> {
        let sp = Span::new(t, &p);
        let s = sp.stripe;
        let lock_set = locks(t, s);
        let targets = write_members(t, s);
        if lock_set.is_empty() || targets.is_empty() {
            // Fewer than k readable members: nothing can be written until one comes back.
            return Err(Retry::Topology);
        }
        self.forget_dead_locks(t, s, held);
        // Every writer of this topology takes all of `lock_set`: one lock of it held without
        // a break since the first attempt means no other writer was in between, even when
        // the place moved because the member it was on died (the second lock place is the
        // next topology's first).
        let kept = lock_set.iter().any(|&m| held.contains(&t.members[m].disk));
        if !kept {
            // Every lock had to be taken (again): another writer may have been in between.
            cache.cols = None;
        }
        self.take_locks(t, s, &lock_set, held, !cache.wrote).await?;
        if let Some(d) = sets_dirty(t, s).filter(|_| !self.cfg.no_dirty_bits) {
            self.dirty(t, s, &d, true).await?;
        }
        let (ca, cb) = sp.columns();
        let touched = sp.chunks();
        // The data chunks whose columns the write does not cover whole: read them.
        let need: Vec<usize> = (0..sp.k)
            .filter(|&j| {
                let (a, b) = sp.in_chunk(j);
                !(touched.contains(&j) && a <= ca && b >= cb)
            })
            .collect();
        let old = match &cache.cols {
            Some((cols, old)) if *cols == (ca, cb) => old.clone(),
            _ if need.is_empty() => vec![None; sp.k],
            _ => {
                let old = self.stripe_columns(t, &sp, (ca, cb), &need).await?;
                cache.cols = Some(((ca, cb), old.clone()));
                old
            }
        };
        let width = (cb - ca) as usize;
        let mut cols: Vec<Bytes> = Vec::with_capacity(sp.k);
        for (j, o) in old.into_iter().enumerate() {
            let (a, b) = sp.in_chunk(j);
            // Where chunk j's new bytes start in `data`.
            let from = (j as u64 * sp.chunk + a).saturating_sub(sp.lo) as usize;
            if touched.contains(&j) && a <= ca && b >= cb {
                // Covered whole: the caller's bytes as they are, no copy.
                let at = from + (ca - a) as usize;
                cols.push(data.slice(at..at + width));
                continue;
            }
            let mut c = BytesMut::with_capacity(width);
            match o {
                Some(o) => c.extend_from_slice(&o),
                None => c.resize(width, 0),
            }
            if touched.contains(&j) {
                let len = (b - a) as usize;
                c[(a - ca) as usize..(a - ca) as usize + len]
                    .copy_from_slice(&data[from..from + len]);
            }
            cols.push(c.freeze());
        }
        let refs: Vec<&[u8]> = cols.iter().map(|c| &c[..]).collect();
        let (pp, qq) = encode(&refs).map_err(Retry::Fatal)?;
        // Columns are independent (P and Q are computed byte by byte), so a write whose
        // intent would not fit one frame (k × width > `MAX_IO_LEN`) is done as slices of
        // columns, each with its intent sent first: a writer fenced in the middle leaves the
        // slices before it whole and the current one described by its intent.
        let slices = if needs_intent(t) {
            column_slices(width, sp.k)
        } else {
            vec![(0, width)]
        };
        for (x, y) in slices {
            let slice = |b: &Bytes| b.slice(x..y);
            let sliced: Vec<Bytes> = cols.iter().map(slice).collect();
            let at = ca + x as u64;
            self.send_intent(t, s, &lock_set, at, &sliced).await?;
            cache.wrote = true;
            let writes = join_all(targets.iter().filter_map(|&m| {
                let i = raid6_shard_of(t, s, m);
                let payload = match i {
                    i if i < sp.k && touched.contains(&i) => sliced[i].clone(),
                    i if i < sp.k => return None,
                    i if i == sp.k => slice(&pp),
                    _ => slice(&qq),
                };
                Some(self.call(
                    t,
                    m,
                    Message::Write {
                        offset: sp.base() + at,
                        data: payload,
                    },
                ))
            }))
            .await;
            // A write that reached some members and not others keeps its locks: it is
            // redone.
            all_ok(writes, "WRITE")?;
        }
        let unit_bytes = sp.chunk * sp.k as u64;
        if let Some(c) = clears_dirty_after(t, s, sp.lo, sp.hi - sp.lo, unit_bytes) {
            let _ = self.dirty(t, s, &c, false).await;
        }
        self.unlock_all(t, s, held).await;
        Ok(())
    }

    /// While a member of the stripe is not RWL, tells the stripe's lock members what the
    /// write leaves in columns `ca..` of every data chunk (`INTENT`), before any shard is
    /// written. Were this client fenced between two shard writes, stale-lock recovery would
    /// otherwise decode the chunk of a member that is not readable from a half-written
    /// stripe, and get bytes no write wrote (`toma sim --raid raid6`). With every member
    /// RWL recovery reads all data chunks and needs no intent, so a healthy volume pays
    /// nothing. `cols` fits one frame: the caller slices wider writes ([`column_slices`]).
    async fn send_intent(
        self: &Arc<Self>,
        t: &Arc<Topology>,
        s: u64,
        lock_set: &[MemberIdx],
        ca: u64,
        cols: &[Bytes],
    ) -> Result<(), Retry> {
        if !needs_intent(t) {
            return Ok(());
        }
        let size: usize = cols.iter().map(Bytes::len).sum();
        let mut data = BytesMut::with_capacity(size);
        for c in cols {
            data.extend_from_slice(c);
        }
        let data = data.freeze();
        let replies = join_all(lock_set.iter().map(|&m| {
            self.call(
                t,
                m,
                Message::Intent {
                    unit: s,
                    column: ca as u32,
                    data: data.clone(),
                },
            )
        }))
        .await;
        all_ok(replies, "INTENT")?;
        self.stats
            .intents
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Rebuild and recovery of stripe `s` under `t` (locks already taken by the caller):
    /// every data chunk read (or reconstructed), P and Q re-encoded, each member of `to`
    /// written its shard. Returns the bytes written per target.
    pub(super) async fn copy_stripe(
        self: &Arc<Self>,
        t: &Arc<Topology>,
        s: u64,
        to: &[MemberIdx],
        clear: Option<&DirtyMarks>,
        intent: Option<(u32, Bytes)>,
    ) -> Result<u64, Retry> {
        let k = t.layout.min_readable();
        let chunk = u64::from(t.chunk_size);
        let sp = Span {
            stripe: s,
            k,
            chunk,
            lo: 0,
            hi: chunk * k as u64,
        };
        let all: Vec<usize> = (0..k).collect();
        let data = self.stripe_columns(t, &sp, (0, chunk), &all).await?;
        let mut data: Vec<Bytes> = data.into_iter().map(Option::unwrap_or_default).collect();
        if let Some((column, cols)) = intent {
            // A fenced writer's intent: its columns as the write leaves them, whatever it
            // managed to write (decoding a half-written stripe returns bytes no write wrote).
            let width = cols.len() / k;
            let (a, b) = (column as usize, column as usize + width);
            if cols.len() % k != 0 || b > chunk as usize {
                return Err(Retry::Fatal(ClientError::Protocol(format!(
                    "write intent of {} bytes at column {column} does not fit stripe {s}",
                    cols.len()
                ))));
            }
            for (j, d) in data.iter_mut().enumerate() {
                let mut m = BytesMut::from(&d[..]);
                if m.len() < b {
                    m.resize(b, 0);
                }
                m[a..b].copy_from_slice(&cols[j * width..(j + 1) * width]);
                *d = m.freeze();
            }
        }
        let refs: Vec<&[u8]> = data.iter().map(|c| &c[..]).collect();
        let (pp, qq) = encode(&refs).map_err(Retry::Fatal)?;
        let writes = join_all(to.iter().map(|&m| {
            let i = raid6_shard_of(t, s, m);
            let payload = match i {
                i if i < k => data[i].clone(),
                i if i == k => pp.clone(),
                _ => qq.clone(),
            };
            self.call(
                t,
                m,
                Message::Write {
                    offset: sp.base(),
                    data: payload,
                },
            )
        }))
        .await;
        for w in writes {
            w?;
        }
        if let Some(c) = clear {
            self.dirty(t, s, c, false).await?;
        }
        Ok(chunk)
    }
}

/// Every reply `Ok`: the first failure as it is, any other answer to `what` as a protocol
/// error.
fn all_ok(replies: Vec<Result<Message, Retry>>, what: &str) -> Result<(), Retry> {
    for r in replies {
        match r? {
            Message::Ok => {}
            other => {
                return Err(Retry::Fatal(ClientError::Protocol(format!(
                    "{what} answered with {:?}",
                    other.kind()
                ))))
            }
        }
    }
    Ok(())
}

/// The column ranges `[x, y)` of a write `width` bytes wide, within it, that a k-data-chunk
/// stripe writes one at a time so that each slice's intent (k × its width) fits one frame.
/// One slice when the whole intent fits (every write of a stripe of chunks up to
/// `MAX_IO_LEN / k`); otherwise slices of whole 4 KiB columns.
fn column_slices(width: usize, k: usize) -> Vec<(usize, usize)> {
    let max = ((toma_wire::MAX_IO_LEN as usize / k.max(1)) / 4096 * 4096).max(4096);
    if width <= max {
        return vec![(0, width)];
    }
    (0..width.div_ceil(max))
        .map(|i| (i * max, ((i + 1) * max).min(width)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::column_slices;

    #[test]
    fn an_intent_wider_than_a_frame_is_sliced_into_whole_columns() {
        let max = toma_wire::MAX_IO_LEN as usize;
        // Fits: one slice, as before.
        assert_eq!(column_slices(65536, 4), vec![(0, 65536)]);
        assert_eq!(column_slices(max / 4, 4), vec![(0, max / 4)]);
        // An 8 MiB chunk written whole with k = 4: 32 MiB of intent, two slices of 4 MiB.
        let w = 8 << 20;
        let s = column_slices(w, 4);
        assert_eq!(s, vec![(0, 4 << 20), (4 << 20, 8 << 20)]);
        // k = 3 does not divide 16 MiB: slices are whole 4 KiB columns, the last one short,
        // each intent within a frame, and together they cover the write exactly once.
        let s = column_slices(w, 3);
        assert!(s.len() > 1);
        assert_eq!(s[0].0, 0);
        assert_eq!(s.last().map(|x| x.1), Some(w));
        for (i, &(x, y)) in s.iter().enumerate() {
            assert!(x < y && 3 * (y - x) <= max, "slice {i}: {x}..{y}");
            assert_eq!(x % 4096, 0);
            if i > 0 {
                assert_eq!(s[i - 1].1, x);
            }
        }
    }
}
