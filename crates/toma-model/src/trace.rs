//! Human-readable counterexamples: one line per action.

use std::fmt::Write as _;

use stateright::Path;

use crate::model::{
    Action, Cell, Msg, OpKind, Prop, Req, Resp, State, TomaModel, CHUNKS, GARBAGE, MIX, REBUILDER,
};

fn actor(a: u8) -> String {
    if a == REBUILDER {
        "rebuilder".into()
    } else {
        format!("client{a}")
    }
}

fn val(v: u8) -> String {
    match v {
        0 => "initial".into(),
        GARBAGE => "garbage".into(),
        MIX => "a mixture".into(),
        v => format!("w{v}"),
    }
}

/// A cell: RAID1 its value; RAID6 the data versions it holds (`-` where it holds none).
fn cell(c: &Cell, raid6: bool) -> String {
    if !raid6 {
        return val(c[0]);
    }
    let v: Vec<_> = c
        .iter()
        .map(|&x| if x == 0 { "-".to_string() } else { val(x) })
        .collect();
    format!("<{}>", v.join(" "))
}

fn req(r: &Req, raid6: bool) -> String {
    match r {
        Req::Lock(c) => format!("LOCK chunk{c}"),
        Req::Write { chunk, data, dirty } => {
            let mut s = format!("WRITE chunk{chunk}");
            if let Some(d) = data {
                let _ = write!(s, " data={}", cell(d, raid6));
            }
            if *dirty != 0 {
                let _ = write!(s, " +SET_DIRTY(targets={dirty:#b})");
            }
            s
        }
        Req::Unlock { chunk, clear } => {
            if *clear != 0 {
                format!("UNLOCK chunk{chunk} +CLEAR_DIRTY(targets={clear:#b})")
            } else {
                format!("UNLOCK chunk{chunk}")
            }
        }
        Req::Read(c) => format!("READ_TEST_LOCK unit{c}"),
        Req::Get(c) => format!("READ unit{c}"),
    }
}

fn resp(r: &Resp, raid6: bool) -> String {
    match r {
        Resp::SwitchTopo(g) => format!("SWITCH_TOPO(g{g})"),
        Resp::LockOk => "LOCK ok".into(),
        Resp::Retry(g) => format!("RETRY (TOMA moved to g{g})"),
        Resp::Done => "ok".into(),
        Resp::ReadOk(v) => format!("data={}", cell(v, raid6)),
        Resp::Rejected => "REJECTED (fenced/stale)".into(),
    }
}

fn target(m: &TomaModel, unit: u8, blocks: u8) -> String {
    if !m.is_raid6() {
        return format!("chunk{unit}");
    }
    if blocks == m.full_mask() {
        return format!("the whole stripe{unit}");
    }
    let j = (0..8).find(|&j| blocks & (1 << j) != 0).unwrap_or(0);
    format!("data chunk {j} of stripe{unit}")
}

pub fn describe(m: &TomaModel, s: &State, a: &Action) -> String {
    let r6 = m.is_raid6();
    match a {
        Action::StartWrite { client, target: t } => {
            let c = &s.clients[usize::from(*client)];
            let (u, b) = m.write_targets()[usize::from(*t)];
            format!(
                "client{client} starts write #{} of {} under g{}",
                c.writes_done + 1,
                target(m, u, b),
                c.gen
            )
        }
        Action::StartRead { client, target: t } => {
            let c = &s.clients[usize::from(*client)];
            let (u, b) = m.read_targets()[usize::from(*t)];
            format!(
                "client{client} starts a read of {} under g{}",
                target(m, u, b),
                c.gen
            )
        }
        Action::Deliver(Msg::Req { from, to, gen, req: r }) => {
            format!(
                "m{to}'s TOMA receives {} from {} (g{gen})",
                req(r, r6),
                actor(*from)
            )
        }
        Action::Deliver(Msg::Resp { from, to, resp: r }) => {
            format!("{} receives {} from m{from}'s TOMA", actor(*to), resp(r, r6))
        }
        Action::TomaLearn(i) => format!(
            "m{i}'s TOMA learns g{} and sends SWITCH_TOPO to its clients",
            s.store_gen()
        ),
        Action::RebuildChunk { member, chunk } => format!(
            "m{member}'s rebuilder locks dirty chunk{chunk} and copies it to the W member"
        ),
        Action::LeaderPublish => "leader writes the topology it computed with plan_with to the control plane (CAS)".into(),
        Action::LeaderCrash => "leader crashes; a standby takes the Lease".into(),
        Action::ZombieWrite => "the deposed leader wakes and tries its stale write".into(),
        Action::FailDisk(i) => format!("m{i}'s disk is unplugged (its TOMA's RAM is lost)"),
        Action::FailTwo(i, j) => format!(
            "m{i}'s and m{j}'s disks are unplugged at once (their TOMAs' RAM is lost)"
        ),
        Action::ReturnDisk { member, new_disk } => {
            if *new_disk {
                format!("a NEW disk is plugged in to replace m{member}")
            } else {
                format!("m{member}'s disk comes back (stale contents)")
            }
        }
        Action::DropConn { client, member } => format!(
            "connection client{client}<->m{member} drops (messages lost, TOMA fences client{client})"
        ),
    }
}

fn summary(m: &TomaModel, s: &State) -> String {
    let t = s.current();
    let tomas: Vec<_> = s
        .tomas
        .iter()
        .map(|t| {
            if t.up {
                format!("g{}", t.gen)
            } else {
                "down".into()
            }
        })
        .collect();
    let clients: Vec<_> = s.clients.iter().map(|c| format!("g{}", c.gen)).collect();
    let data: Vec<_> = s
        .disks
        .iter()
        .map(|d| {
            let v: Vec<_> = d.data[..usize::from(m.units())]
                .iter()
                .map(|v| cell(v, m.is_raid6()))
                .collect();
            format!("[{}]", v.join(","))
        })
        .collect();
    format!(
        "store {t} | TOMAs {} | clients {} | disks {}",
        tomas.join(","),
        clients.join(","),
        data.join(" ")
    )
}

fn why(m: &TomaModel, name: &str, s: &State) -> String {
    if let Some(v) = &s.violation {
        let want = v.want.map(val).unwrap_or_else(|| "a written value".into());
        let what = match v.prop {
            Prop::P1 => "after the write was acknowledged with no other write in flight",
            Prop::P2 => "a quiet read returned something else before",
            Prop::P3 => "no write ever wrote it",
            Prop::Planner => "the planner refused its input",
            Prop::Rmw => {
                return format!(
                    "client{}'s read-modify-write decoded data chunk {} of the stripe as {}, \
                     which no write wrote: the parity it writes would be wrong",
                    v.client,
                    v.chunk,
                    val(v.got)
                )
            }
        };
        return format!(
            "client{}'s read of block{} returned {}, expected {want} ({what})",
            v.client,
            v.chunk,
            val(v.got)
        );
    }
    if name.starts_with("P4") {
        return "the volume is Normal with nothing in flight but the members differ (or parity \
                does not match the data, or the data is not the last acknowledged write)"
            .into();
    }
    if name.starts_with("P5") {
        for c in 0..CHUNKS as u8 {
            let h = m.holders(s, c);
            if h.len() > 1 {
                let who: Vec<_> = h
                    .iter()
                    .map(|(a, g)| format!("{} (lock set of g{g})", actor(*a)))
                    .collect();
                return format!(
                    "chunk{c}: {} all hold a complete lock set",
                    who.join(" and ")
                );
            }
        }
    }
    if name.starts_with("P6") {
        let stuck: Vec<_> = s
            .clients
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                c.op.as_ref().map(|o| {
                    let k = match o.kind {
                        OpKind::Write(id) => format!("write w{id}"),
                        OpKind::Read => "read".into(),
                    };
                    format!(
                        "client{i} {k} of chunk{} stuck in {:?} (g{})",
                        o.chunk, o.stage, o.gen
                    )
                })
            })
            .collect();
        return format!(
            "no action is possible but the goal (Normal, every op done) is not reached; {}",
            if stuck.is_empty() {
                format!("volume is {}", s.current().phase())
            } else {
                stuck.join("; ")
            }
        );
    }
    String::new()
}

pub fn render(m: &TomaModel, name: &str, path: Path<State, Action>) -> String {
    let steps = path.into_vec();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "  0. initial: {}",
        steps
            .first()
            .map(|(s, _)| summary(m, s))
            .unwrap_or_default()
    );
    let mut last = None;
    for (k, w) in steps.windows(2).enumerate() {
        let (s, a) = &w[0];
        let next = &w[1].0;
        if let Some(a) = a {
            let _ = writeln!(out, "{:>3}. {}", k + 1, describe(m, s, a));
            let _ = writeln!(out, "       -> {}", summary(m, next));
        }
        last = Some(next);
    }
    if let Some(s) = last.or(steps.first().map(|(s, _)| s)) {
        let _ = writeln!(out, "property violated: {name}: {}", why(m, name, s));
    }
    out
}
