//! TFRecord framing, the container of TensorBoard event files (TensorFlow's
//! `core/lib/io/record_writer.cc`): each record is
//!
//! ```text
//! u64 length (little-endian) | u32 masked_crc32c(length bytes) | data | u32 masked_crc32c(data)
//! ```
//!
//! with `masked_crc32c(x) = rotate_right(crc32c(x), 15) + 0xa282ead8` (wrapping).

use std::io::Write;

/// TensorFlow's `kMaskDelta`.
const MASK_DELTA: u32 = 0xa282_ead8;

/// The masked CRC32C (Castagnoli) of `data`, as TFRecord stores it.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data).rotate_right(15).wrapping_add(MASK_DELTA)
}

/// Writes one framed record.
pub fn write_record(out: &mut impl Write, data: &[u8]) -> std::io::Result<()> {
    let len = (data.len() as u64).to_le_bytes();
    out.write_all(&len)?;
    out.write_all(&masked_crc32c(&len).to_le_bytes())?;
    out.write_all(data)?;
    out.write_all(&masked_crc32c(data).to_le_bytes())
}

/// How a file's records end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tail {
    /// Every byte belongs to a complete, intact record.
    Clean,
    /// The file ends inside a record (a writer killed mid-write), at this byte offset.
    Truncated {
        /// Offset of the incomplete record.
        offset: u64,
    },
    /// A record's length or data does not match its checksum, at this byte offset.
    Corrupt {
        /// Offset of the damaged record.
        offset: u64,
    },
}

/// The intact records at the start of a file and how the file ends: reading stops at the
/// first incomplete or damaged record, since nothing after it can be framed reliably.
pub fn read_records(bytes: &[u8]) -> (Vec<&[u8]>, Tail) {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let u32_at = |p: usize| u32::from_le_bytes([bytes[p], bytes[p + 1], bytes[p + 2], bytes[p + 3]]);
    while pos < bytes.len() {
        let offset = pos as u64;
        if bytes.len() - pos < 12 {
            return (out, Tail::Truncated { offset });
        }
        let len_bytes = &bytes[pos..pos + 8];
        if u32_at(pos + 8) != masked_crc32c(len_bytes) {
            return (out, Tail::Corrupt { offset });
        }
        let mut len8 = [0u8; 8];
        len8.copy_from_slice(len_bytes);
        let len = u64::from_le_bytes(len8);
        let data_start = pos + 12;
        let available = (bytes.len() - data_start) as u64;
        if len > available || available - len < 4 {
            return (out, Tail::Truncated { offset });
        }
        let data_end = data_start + len as usize;
        let data = &bytes[data_start..data_end];
        if u32_at(data_end) != masked_crc32c(data) {
            return (out, Tail::Corrupt { offset });
        }
        out.push(data);
        pos = data_end + 4;
    }
    (out, Tail::Clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_castagnoli_check_value_and_tensorflow_masking() {
        // CRC-32C check value of "123456789" (RFC 3720, appendix B.4).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        // ((crc >> 15) | (crc << 17)) + 0xa282ead8 mod 2^32, computed by hand.
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
    }

    #[test]
    fn records_round_trip_and_a_damaged_tail_is_reported() {
        let mut buf = Vec::new();
        for r in [&b"first"[..], b"", b"third record"] {
            write_record(&mut buf, r).unwrap();
        }
        let (recs, tail) = read_records(&buf);
        assert_eq!(recs, vec![&b"first"[..], b"", b"third record"]);
        assert_eq!(tail, Tail::Clean);
        let third = (12 + 5 + 4) + (12 + 4);
        for cut in [third + 3, third + 12, buf.len() - 1] {
            let (recs, tail) = read_records(&buf[..cut]);
            assert_eq!(recs.len(), 2, "cut at {cut}");
            assert_eq!(tail, Tail::Truncated { offset: third as u64 });
        }
        let mut bad = buf.clone();
        bad[third + 14] ^= 1; // a data byte of the third record
        assert_eq!(read_records(&bad).1, Tail::Corrupt { offset: third as u64 });
        let mut bad = buf.clone();
        bad[third] = 0xff; // its length
        assert_eq!(read_records(&bad).1, Tail::Corrupt { offset: third as u64 });
    }
}
