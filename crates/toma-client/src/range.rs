//! Splitting a volume byte range into lock units.

/// One lock unit's part of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitPart {
    pub unit: u64,
    /// Byte offset in the volume (RAID1: also the offset in every member's extent).
    pub offset: u64,
    pub len: u32,
    /// Where this part starts in the caller's buffer.
    pub buf_offset: usize,
}

/// Splits `[offset, offset + len)` at lock-unit boundaries.
pub fn split(offset: u64, len: usize, unit_bytes: u64) -> Vec<UnitPart> {
    let mut parts = Vec::new();
    let mut pos = offset;
    let end = offset.saturating_add(len as u64);
    while pos < end && unit_bytes > 0 {
        let unit = pos / unit_bytes;
        let unit_end = (unit + 1).saturating_mul(unit_bytes).min(end);
        let part_len = unit_end - pos;
        parts.push(UnitPart {
            unit,
            offset: pos,
            len: u32::try_from(part_len).unwrap_or(u32::MAX),
            buf_offset: (pos - offset) as usize,
        });
        pos = unit_end;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_unit_boundaries() {
        let p = split(60, 10, 64);
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].unit, p[0].offset, p[0].len, p[0].buf_offset),
            (0, 60, 4, 0)
        );
        assert_eq!(
            (p[1].unit, p[1].offset, p[1].len, p[1].buf_offset),
            (1, 64, 6, 4)
        );
        assert!(split(0, 0, 64).is_empty());
        assert_eq!(split(128, 64, 64).len(), 1);
    }
}
