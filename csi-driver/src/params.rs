//! StorageClass parameters and capacity ranges, checked before anything is created. Every
//! refusal names the parameter (pure: no I/O).

use std::collections::HashMap;

use toma_core::layout::validate_chunk_size;
use toma_core::{Layout, VolumeSpec, DEFAULT_CHUNK_SIZE};

/// Size of a volume created without a capacity range: 1 GiB.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Volume sizes are rounded up to a multiple of this (and of the volume's lock unit).
pub const SIZE_ALIGN: u64 = 1 << 20;

/// Keys the external-provisioner adds (`csi.storage.k8s.io/...`): not ours, ignored.
const CO_PREFIX: &str = "csi.storage.k8s.io/";

/// The file systems NodeStage can make.
pub const FS_TYPES: [&str; 2] = ["ext4", "xfs"];

/// What a StorageClass asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeParams {
    pub layout: Layout,
    pub chunk_size: u32,
    /// `fsType` parameter, if given (the capability's fs type wins at NodeStage).
    pub fs_type: Option<String>,
}

impl VolumeParams {
    /// Parses `raid` (`raid1` | `raid6`, default raid1), `mirrors` (RAID1, default 2),
    /// `dataMembers` (RAID6, default 4), `chunkSize` (bytes, or with a `Ki`/`Mi` suffix;
    /// default 64Ki) and `fsType` (ext4 | xfs). Unknown keys are refused.
    pub fn parse(params: &HashMap<String, String>) -> Result<VolumeParams, String> {
        for k in params.keys() {
            if !k.starts_with(CO_PREFIX)
                && !["raid", "mirrors", "dataMembers", "chunkSize", "fsType"].contains(&k.as_str())
            {
                return Err(format!(
                    "parameter {k:?} is not known (known: raid, mirrors, dataMembers, chunkSize, fsType)"
                ));
            }
        }
        let get = |k: &str| params.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let small = |k: &str, v: &str| -> Result<u8, String> {
            v.parse::<u8>()
                .map_err(|_| format!("parameter {k} = {v:?}: not a small whole number"))
        };
        let raid = get("raid").unwrap_or("raid1");
        let layout = match raid {
            "raid1" => {
                if get("dataMembers").is_some() {
                    return Err("parameter dataMembers applies to raid6 only (raid = raid1)".into());
                }
                let m = get("mirrors").map(|v| small("mirrors", v)).transpose()?;
                Layout::raid1(m.unwrap_or(2)).map_err(|e| format!("parameter {e}"))?
            }
            "raid6" => {
                if get("mirrors").is_some() {
                    return Err("parameter mirrors applies to raid1 only (raid = raid6)".into());
                }
                let d = get("dataMembers")
                    .map(|v| small("dataMembers", v))
                    .transpose()?;
                Layout::raid6(d.unwrap_or(4)).map_err(|e| format!("parameter {e}"))?
            }
            other => {
                return Err(format!(
                    "parameter raid = {other:?}: must be raid1 or raid6"
                ))
            }
        };
        let chunk_size = match get("chunkSize") {
            None => DEFAULT_CHUNK_SIZE,
            Some(v) => {
                let bytes = parse_bytes(v).ok_or_else(|| {
                    format!("parameter chunkSize = {v:?}: not a size (e.g. 65536 or 64Ki)")
                })?;
                validate_chunk_size(bytes).map_err(|e| format!("parameter {e}"))?
            }
        };
        let fs_type = match get("fsType") {
            None => None,
            Some(f) if FS_TYPES.contains(&f) => Some(f.to_string()),
            Some(f) => {
                return Err(format!(
                    "parameter fsType = {f:?}: must be one of {}",
                    FS_TYPES.join(", ")
                ))
            }
        };
        Ok(VolumeParams {
            layout,
            chunk_size,
            fs_type,
        })
    }

    /// The volume's spec for a capacity range: the smallest size >= `required` (default
    /// [`DEFAULT_SIZE`]) that is a multiple of 1 MiB and of the lock unit; `Err` with the
    /// reason when that exceeds `limit` (0: none).
    pub fn spec_for(&self, required: i64, limit: i64) -> Result<VolumeSpec, String> {
        if required < 0 || limit < 0 {
            return Err(format!(
                "capacity_range: negative bytes (required {required}, limit {limit})"
            ));
        }
        let (required, limit) = (required as u64, limit as u64);
        if limit > 0 && required > limit {
            return Err(format!(
                "capacity_range: required_bytes {required} > limit_bytes {limit}"
            ));
        }
        let want = if required == 0 {
            if limit > 0 {
                limit.min(DEFAULT_SIZE)
            } else {
                DEFAULT_SIZE
            }
        } else {
            required
        };
        let unit = u64::from(self.chunk_size) * self.layout.data_chunks_per_unit();
        let align = lcm(unit, SIZE_ALIGN);
        let size = want
            .checked_next_multiple_of(align)
            .ok_or_else(|| format!("capacity_range: {want} bytes is too large"))?;
        if limit > 0 && size > limit {
            return Err(format!(
                "capacity_range: the smallest size >= {want} bytes that {} can hold ({}) is {size} bytes, over limit_bytes {limit}",
                self.layout,
                unit_desc(self.layout, self.chunk_size)
            ));
        }
        VolumeSpec::new(self.layout, u64::from(self.chunk_size), size).map_err(|e| e.to_string())
    }
}

/// The size volume `spec` should grow to for an expansion request: the smallest multiple
/// of 1 MiB and of the lock unit `>= required` (or the volume's size when it is that large
/// already; a volume never shrinks). `Err` names the sizes when `limit` is below the
/// volume's size or below the size the layout can hold.
pub fn expand_size(spec: &VolumeSpec, required: i64, limit: i64) -> Result<u64, String> {
    if required < 0 || limit < 0 {
        return Err(format!(
            "capacity_range: negative bytes (required {required}, limit {limit})"
        ));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit > 0 && required > limit {
        return Err(format!(
            "capacity_range: required_bytes {required} > limit_bytes {limit}"
        ));
    }
    if limit > 0 && limit < spec.size {
        return Err(format!(
            "capacity_range: limit_bytes {limit} is below the volume's size {} bytes; volumes never shrink",
            spec.size
        ));
    }
    if required <= spec.size {
        return Ok(spec.size);
    }
    let align = lcm(spec.unit_bytes(), SIZE_ALIGN);
    let size = required
        .checked_next_multiple_of(align)
        .ok_or_else(|| format!("capacity_range: {required} bytes is too large"))?;
    if limit > 0 && size > limit {
        return Err(format!(
            "capacity_range: the smallest size >= {required} bytes that {} can hold ({}) is {size} bytes, over limit_bytes {limit}",
            spec.layout,
            unit_desc(spec.layout, spec.chunk_size)
        ));
    }
    Ok(size)
}

/// What a size of `layout` must be a multiple of, naming the parameters: the lock unit
/// (the chunk for RAID1, the stripe `chunkSize × dataMembers` for RAID6) and 1 MiB.
fn unit_desc(layout: Layout, chunk_size: u32) -> String {
    let unit = u64::from(chunk_size) * layout.data_chunks_per_unit();
    match layout {
        Layout::Raid1 { .. } => format!(
            "a multiple of chunkSize {chunk_size} and of {SIZE_ALIGN} bytes"
        ),
        Layout::Raid6 { data } => format!(
            "a multiple of the stripe, chunkSize {chunk_size} x dataMembers {data} = {unit} bytes, and of {SIZE_ALIGN} bytes"
        ),
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn lcm(a: u64, b: u64) -> u64 {
    a / gcd(a, b) * b
}

/// `65536`, `64Ki`, `1Mi` → bytes.
pub fn parse_bytes(v: &str) -> Option<u64> {
    let (num, mult) = if let Some(n) = v.strip_suffix("Ki") {
        (n, 1u64 << 10)
    } else if let Some(n) = v.strip_suffix("Mi") {
        (n, 1u64 << 20)
    } else {
        (v, 1)
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// A Kubernetes object name for a CSI volume name: the name itself when it is a valid
/// lowercase DNS label of at most 40 characters (e.g. `pvc-<uuid>`), otherwise `csi-`
/// followed by a 128-bit hash of it (CSI names may hold any characters, up to 128 bytes).
/// Deterministic, so a repeated CreateVolume finds the volume it made.
pub fn object_name(csi_name: &str) -> String {
    let b = csi_name.as_bytes();
    let label_ok = !b.is_empty()
        && b.len() <= 40
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && !csi_name.starts_with("csi-");
    if label_ok {
        return csi_name.to_string();
    }
    // FNV-1a, 128 bits.
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for c in b {
        h ^= u128::from(*c);
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    format!("csi-{h:032x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_and_good_values() {
        let v = VolumeParams::parse(&p(&[])).unwrap();
        assert_eq!(v.layout, Layout::raid1(2).unwrap());
        assert_eq!(v.chunk_size, DEFAULT_CHUNK_SIZE);
        let v = VolumeParams::parse(&p(&[
            ("raid", "raid6"),
            ("dataMembers", "2"),
            ("chunkSize", "16Ki"),
            ("fsType", "xfs"),
            ("csi.storage.k8s.io/pvc/name", "x"),
        ]))
        .unwrap();
        assert_eq!(v.layout, Layout::raid6(2).unwrap());
        assert_eq!(v.chunk_size, 16384);
        assert_eq!(v.fs_type.as_deref(), Some("xfs"));
    }

    #[test]
    fn bad_values_name_the_parameter() {
        for (kv, needle) in [
            (vec![("raid", "raid5")], "raid"),
            (vec![("mirrors", "4")], "mirrors"),
            (vec![("mirrors", "two")], "mirrors"),
            (vec![("raid", "raid6"), ("dataMembers", "1")], "dataMembers"),
            (vec![("raid", "raid6"), ("mirrors", "2")], "mirrors"),
            (vec![("dataMembers", "3")], "dataMembers"),
            (vec![("chunkSize", "3000")], "chunkSize"),
            (vec![("chunkSize", "big")], "chunkSize"),
            (vec![("fsType", "btrfs")], "fsType"),
            (vec![("colour", "blue")], "colour"),
        ] {
            let e = VolumeParams::parse(&p(&kv)).unwrap_err();
            assert!(e.contains(needle), "{kv:?}: {e}");
        }
    }

    #[test]
    fn sizes_round_up_within_the_limit() {
        let v = VolumeParams::parse(&p(&[("raid", "raid6"), ("dataMembers", "3")])).unwrap();
        let s = v.spec_for(1, 0).unwrap();
        // Lock unit 3 x 64 KiB and 1 MiB: lcm = 3 MiB.
        assert_eq!(s.size, 3 << 20);
        assert_eq!(v.spec_for(0, 0).unwrap().size % (3 << 20), 0);
        assert!(v.spec_for(0, 0).unwrap().size >= DEFAULT_SIZE);
        let e = v.spec_for(1, 2 << 20).unwrap_err();
        assert!(e.contains("limit_bytes"), "{e}");
        assert!(v.spec_for(5, 4).unwrap_err().contains("required_bytes"));
        assert!(v.spec_for(-1, 0).is_err());
        let r1 = VolumeParams::parse(&p(&[])).unwrap();
        assert_eq!(r1.spec_for(1 << 20, 1 << 20).unwrap().size, 1 << 20);
    }

    #[test]
    fn expansion_sizes_round_up_and_never_shrink() {
        let v = VolumeParams::parse(&p(&[("raid", "raid6"), ("dataMembers", "3")])).unwrap();
        let s = v.spec_for(3 << 20, 0).unwrap();
        // Lock unit 3 x 64 KiB and 1 MiB: lcm = 3 MiB.
        assert_eq!(expand_size(&s, 4 << 20, 0), Ok(6 << 20));
        assert_eq!(expand_size(&s, 1, 0), Ok(3 << 20), "at or below: the size");
        assert_eq!(expand_size(&s, 0, 0), Ok(3 << 20));
        let e = expand_size(&s, 0, 2 << 20).unwrap_err();
        assert!(
            e.contains("never shrink") && e.contains("3145728") && e.contains("2097152"),
            "{e}"
        );
        let e = expand_size(&s, 4 << 20, 5 << 20).unwrap_err();
        assert!(
            e.contains("6291456") && e.contains("limit_bytes 5242880"),
            "{e}"
        );
        assert!(expand_size(&s, 5, 4)
            .unwrap_err()
            .contains("required_bytes"));
        assert!(expand_size(&s, -1, 0).is_err());
    }

    #[test]
    fn raid6_sizes_stay_whole_stripes() {
        // 4+2 with 64 KiB chunks: a 256 KiB stripe, so 1 MiB multiples are whole stripes;
        // 5 data members with 64 KiB chunks: a 320 KiB stripe, lcm with 1 MiB = 5 MiB.
        let v = VolumeParams::parse(&p(&[("raid", "raid6"), ("dataMembers", "5")])).unwrap();
        let s = v.spec_for(96 << 20, 0).unwrap();
        assert_eq!(s.size, 100 << 20);
        assert_eq!(s.size % s.unit_bytes(), 0);
        let grown = expand_size(&s, (100 << 20) + 1, 0).unwrap();
        assert_eq!(grown, 105 << 20);
        assert_eq!(grown % (5 * 65536), 0, "whole stripes");
        assert!(s.grown(grown).is_ok());
        // A limit that leaves no whole stripe above the request: refused, naming the stripe.
        let e = expand_size(&s, (100 << 20) + 1, 104 << 20).unwrap_err();
        assert!(
            e.contains("stripe")
                && e.contains("chunkSize 65536 x dataMembers 5 = 327680")
                && e.contains("limit_bytes"),
            "{e}"
        );
        let e = v.spec_for(1, 4 << 20).unwrap_err();
        assert!(e.contains("dataMembers 5"), "{e}");
        let r1 = VolumeParams::parse(&p(&[("chunkSize", "4Mi")])).unwrap();
        let e = r1.spec_for(1, 2 << 20).unwrap_err();
        assert!(e.contains("chunkSize 4194304"), "{e}");
    }

    #[test]
    fn object_names_are_valid_and_deterministic() {
        assert_eq!(object_name("pvc-0123"), "pvc-0123");
        let a = object_name("sanity-Controller Service CreateVolume-1234");
        assert_eq!(
            a,
            object_name("sanity-Controller Service CreateVolume-1234")
        );
        assert_ne!(
            a,
            object_name("sanity-Controller Service CreateVolume-1235")
        );
        assert!(a.starts_with("csi-") && a.len() == 36, "{a}");
        assert_ne!(object_name("csi-x"), "csi-x");
        assert!(object_name(&"a".repeat(128)).starts_with("csi-"));
        assert_eq!(parse_bytes("64Ki"), Some(65536));
        assert_eq!(parse_bytes("x"), None);
    }
}
