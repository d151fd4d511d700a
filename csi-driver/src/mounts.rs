//! Mounts, loop devices and file systems, through the system's own tools (`mount`,
//! `umount`, `losetup`, `blkid`, `mkfs.*`), and the mount table (`/proc/self/mountinfo`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `prog args`, returning stdout, or an error with its stderr.
pub fn run(prog: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .map_err(|e| format!("{prog}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{prog} {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            if out.stderr.is_empty() {
                format!("exit {}", out.status)
            } else {
                String::new()
            }
        ))
    }
}

/// A mount point from `/proc/self/mountinfo`, with its source device (`major:minor`) and
/// the root within it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub dev: String,
    pub root: String,
    pub target: PathBuf,
    pub fstype: String,
    pub source: String,
}

fn unescape(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo (octal).
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| {
                d.iter()
                    .fold(0u8, |v, c| v.wrapping_mul(8).wrapping_add(c - b'0'))
            });
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(MountEntry {
                dev: f.get(2)?.to_string(),
                root: unescape(f.get(3)?),
                target: PathBuf::from(unescape(f.get(4)?)),
                fstype: r.first()?.to_string(),
                source: unescape(r.get(1).unwrap_or(&"")),
            })
        })
        .collect()
}

pub fn mount_table() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default()
}

/// The mounts whose target is `path` (the last one is on top).
pub fn mounts_at(path: &Path) -> Vec<MountEntry> {
    mount_table()
        .into_iter()
        .filter(|m| m.target == path)
        .collect()
}

pub fn is_mounted(path: &Path) -> bool {
    !mounts_at(path).is_empty()
}

/// Unmounts every mount stacked at `path` (none: nothing to do).
pub fn umount_all(path: &Path) -> Result<(), String> {
    let p = path.to_string_lossy();
    for _ in 0..16 {
        if !is_mounted(path) {
            return Ok(());
        }
        run("umount", &[&p])?;
    }
    Err(format!("{p}: still mounted after 16 unmounts"))
}

/// The file system type on `dev`, or `None` when it holds none (blkid finds nothing).
pub fn fs_type(dev: &Path) -> Result<Option<String>, String> {
    let d = dev.to_string_lossy();
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE", &d])
        .output()
        .map_err(|e| format!("blkid: {e}"))?;
    match out.status.code() {
        Some(0) => {
            let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
            Ok((!t.is_empty()).then_some(t))
        }
        // 2: nothing found.
        Some(2) => Ok(None),
        _ => Err(format!(
            "blkid -p {d}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// A RAID6 volume's geometry, for the file system to align its writes to whole stripes:
/// `chunk` bytes per data chunk, `data` data chunks per stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stripe {
    pub chunk: u64,
    pub data: u64,
}

impl Stripe {
    /// From a volume context: `raid` = `raid6-K+2` and `chunkSize` (bytes). `None` for RAID1,
    /// or a context without them (a volume made before they were recorded).
    pub fn from_context(raid: Option<&str>, chunk: Option<&str>) -> Option<Stripe> {
        let data = raid?
            .strip_prefix("raid6-")?
            .strip_suffix("+2")?
            .parse()
            .ok()?;
        let chunk: u64 = chunk?.parse().ok()?;
        (chunk >= 4096 && chunk.is_power_of_two() && data >= 2).then_some(Stripe { chunk, data })
    }
}

/// The mkfs arguments (before the device) for `fs` on a volume with geometry `stripe`.
pub fn mkfs_args(fs: &str, stripe: Option<Stripe>) -> Result<(&'static str, Vec<String>), String> {
    match fs {
        "ext4" => {
            let mut ext = "nodiscard,lazy_itable_init=1,lazy_journal_init=1".to_string();
            let mut args = vec!["-F".to_string(), "-q".to_string()];
            if let Some(s) = stripe {
                // In 4 KiB file-system blocks: a chunk (stride) and a stripe's data (width).
                let stride = s.chunk / 4096;
                ext.push_str(&format!(
                    ",stride={stride},stripe_width={}",
                    stride * s.data
                ));
                args.extend(["-b".to_string(), "4096".to_string()]);
            }
            args.extend(["-E".to_string(), ext]);
            Ok(("mkfs.ext4", args))
        }
        "xfs" => {
            let mut args = vec!["-f".to_string(), "-q".to_string(), "-K".to_string()];
            if let Some(s) = stripe {
                args.extend(["-d".to_string(), format!("su={},sw={}", s.chunk, s.data)]);
            }
            Ok(("mkfs.xfs", args))
        }
        other => Err(format!("mkfs: unsupported fs type {other:?}")),
    }
}

/// Makes a file system of type `fs` (ext4 or xfs) on `dev`, without discarding. Inode
/// tables and the journal are written in full: a new volume's blocks are not zeroed (they
/// may hold an earlier volume's bytes), so nothing may rely on them reading as zeros. On a
/// RAID6 volume the file system is told the stripe geometry (ext4 `stride`/`stripe_width`,
/// xfs `su`/`sw`), so that it lays out and writes whole stripes where it can.
///
/// Some mkfs versions refuse the geometry on small devices (mkfs.xfs 6.x: "Log size must be
/// at least 64MB" below about 1 GiB): then the file system is made without it, and a warning
/// says so — the hints are an optimisation, the volume is usable either way.
pub fn mkfs(fs: &str, dev: &Path, stripe: Option<Stripe>) -> Result<(), String> {
    let make = |stripe: Option<Stripe>| {
        let (cmd, mut args) = mkfs_args(fs, stripe)?;
        args.push(dev.to_string_lossy().into_owned());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run(cmd, &refs).map(|_| ())
    };
    match make(stripe) {
        Err(e) if stripe.is_some() => {
            tracing::warn!(device = %dev.display(), fs, error = %e.lines().next().unwrap_or_default(), "mkfs refused the RAID6 stripe geometry; making the file system without it");
            make(None)
        }
        other => other,
    }
}

/// Attaches `file` to a free loop device with 4 KiB sectors (so every request is 4 KiB
/// aligned); returns the device path.
pub fn loop_attach(file: &Path) -> Result<PathBuf, String> {
    let f = file.to_string_lossy();
    run(
        "losetup",
        &["--find", "--show", "--sector-size", "4096", &f],
    )
    .map(PathBuf::from)
}

/// The loop device backed by `file`, if any.
pub fn loop_of(file: &Path) -> Option<PathBuf> {
    let f = file.to_string_lossy();
    let out = run(
        "losetup",
        &["--noheadings", "--output", "NAME", "--associated", &f],
    )
    .ok()?;
    out.lines().next().map(|l| PathBuf::from(l.trim()))
}

pub fn loop_detach(dev: &Path) -> Result<(), String> {
    run("losetup", &["--detach", &dev.to_string_lossy()]).map(|_| ())
}

/// Makes loop device `dev` take the current size of its backing file (`losetup -c`).
pub fn loop_set_capacity(dev: &Path) -> Result<(), String> {
    run("losetup", &["--set-capacity", &dev.to_string_lossy()]).map(|_| ())
}

/// Grows the mounted file system of type `fs` on `dev` (mounted at `mountpoint`) to the
/// device's size, online. An ext4 that already fills the device is left alone.
pub fn grow_fs(fs: &str, dev: &Path, mountpoint: &Path) -> Result<(), String> {
    match fs {
        "ext4" => {
            let dev_bytes = block_size_of(dev).unwrap_or(0);
            if ext4_bytes(dev).is_some_and(|b| b >= dev_bytes) {
                return Ok(());
            }
            run("resize2fs", &[&dev.to_string_lossy()])
                .map(|_| ())
                .map_err(|e| {
                    if e.contains("Permission denied") {
                        format!(
                        "{e} (an online ext4 resize needs CAP_SYS_RESOURCE, which this node plugin \
                         lacks; the volume did grow: unstage and stage it again and the file \
                         system grows then, offline)"
                    )
                    } else {
                        e
                    }
                })
        }
        "xfs" => run("xfs_growfs", &[&mountpoint.to_string_lossy()]).map(|_| ()),
        other => Err(format!(
            "growing a file system: unsupported fs type {other:?}"
        )),
    }
}

/// Grows an unmounted ext4 on `dev` to the device's size if it is smaller (after a forced
/// check, which resize2fs requires). Other file systems grow once mounted ([`grow_fs`]).
pub fn grow_unmounted(fs: &str, dev: &Path) -> Result<bool, String> {
    if fs != "ext4" {
        return Ok(false);
    }
    let dev_bytes = block_size_of(dev).unwrap_or(0);
    if ext4_bytes(dev).is_none_or(|b| b >= dev_bytes) {
        return Ok(false);
    }
    let d = dev.to_string_lossy();
    // Exit status 1: errors were corrected; anything above is a failure.
    let out = Command::new("e2fsck")
        .args(["-f", "-p", &d])
        .output()
        .map_err(|e| format!("e2fsck: {e}"))?;
    if out.status.code().is_none_or(|c| c > 1) {
        return Err(format!(
            "e2fsck -f -p {d}: {}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    run("resize2fs", &[&d]).map(|_| true)
}

/// The size in bytes of the ext4 on `dev` (block count × block size, from its superblock).
pub fn ext4_bytes(dev: &Path) -> Option<u64> {
    let out = run("dumpe2fs", &["-h", &dev.to_string_lossy()]).ok()?;
    let field = |name: &str| -> Option<u64> {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(field("Block count:")? * field("Block size:")?)
}

/// Bytes of the block device `dev` (via sysfs).
pub fn block_size_of(dev: &Path) -> Option<u64> {
    let name = dev.file_name()?.to_string_lossy().into_owned();
    let sectors: u64 = std::fs::read_to_string(format!("/sys/class/block/{name}/size"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(sectors * 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripe_geometry_comes_from_the_volume_context() {
        assert_eq!(
            Stripe::from_context(Some("raid6-4+2"), Some("65536")),
            Some(Stripe {
                chunk: 65536,
                data: 4
            })
        );
        assert_eq!(Stripe::from_context(Some("raid1x2"), Some("65536")), None);
        assert_eq!(Stripe::from_context(Some("raid6-4+2"), None), None);
        assert_eq!(Stripe::from_context(Some("raid6-x+2"), Some("65536")), None);
        assert_eq!(Stripe::from_context(Some("raid6-4+2"), Some("1000")), None);
    }

    /// The real mkfs accepts the geometry, and the file system records it (ext4's
    /// `RAID stride` / `RAID stripe width`, xfs's `sunit` / `swidth`).
    #[test]
    fn mkfs_records_the_raid6_stripe_geometry() {
        let dir = std::env::temp_dir().join(format!("toma-mkfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let stripe = Some(Stripe {
            chunk: 65536,
            data: 4,
        });
        for fs in ["ext4", "xfs"] {
            let img = dir.join(format!("{fs}.img"));
            let f = std::fs::File::create(&img).unwrap();
            f.set_len(1 << 30).unwrap();
            drop(f);
            mkfs(fs, &img, stripe).unwrap();
            let i = img.to_string_lossy().into_owned();
            let info = if fs == "ext4" {
                run("dumpe2fs", &["-h", &i]).unwrap()
            } else {
                run("xfs_db", &["-r", "-c", "sb 0", "-c", "p unit width", &i]).unwrap()
            };
            if fs == "ext4" {
                assert!(info.contains("RAID stride:              16"), "{info}");
                assert!(info.contains("RAID stripe width:        64"), "{info}");
            } else {
                assert!(info.contains("unit = 16"), "{info}");
                assert!(info.contains("width = 64"), "{info}");
            }
        }
        // Too small for mkfs.xfs with the geometry: made without it, not refused.
        let img = dir.join("small.img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(512 << 20).unwrap();
        drop(f);
        mkfs("xfs", &img, stripe).unwrap();
        assert_eq!(fs_type(&img).unwrap().as_deref(), Some("xfs"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let t = "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext4 /dev/loop3 rw\n\
                 37 35 0:50 / /var/x rw shared:2 - fuse toma rw,user_id=0\n";
        let m = parse_mountinfo(t);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].target, PathBuf::from("/mnt/a b"));
        assert_eq!(m[0].root, "/mnt1");
        assert_eq!(m[0].fstype, "ext4");
        assert_eq!(m[0].source, "/dev/loop3");
        assert_eq!(m[1].dev, "0:50");
    }
}
