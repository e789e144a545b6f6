//! An event-file reader written from TensorBoard's formats alone, sharing no code with the
//! writer: TFRecord framing (`u64 len | masked crc32c(len) | data | masked crc32c(data)`), a
//! bitwise CRC-32C, and a protocol-buffer wire decoder for the fields of `event.proto`,
//! `summary.proto` and `histogram.proto` (numbers as in those files).

use std::path::{Path, PathBuf};

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// TensorFlow's masked CRC: `((crc >> 15) | (crc << 17)) + 0xa282ead8`.
fn masked(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// A decoded summary value.
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    /// `simple_value`.
    Scalar(f32),
    /// `histo`: min, max, num, sum, sum_squares, bucket_limit, bucket.
    Histo {
        min: f64,
        max: f64,
        num: f64,
        sum: f64,
        sum_squares: f64,
        limits: Vec<f64>,
        counts: Vec<f64>,
    },
    /// A string tensor and the plugin named in its metadata.
    Text { plugin: String, text: String },
}

/// One summary value.
#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    pub tag: String,
    pub payload: Payload,
}

/// One event.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: i64,
    pub file_version: Option<String>,
    pub values: Vec<Value>,
    /// `SessionLog.status` (1 = START).
    pub session_status: Option<u64>,
}

/// Protocol-buffer fields of a message: (number, wire data).
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

fn varint(b: &[u8], pos: &mut usize) -> u64 {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let byte = b[*pos];
        *pos += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte & 0x80 == 0 {
            return v;
        }
        shift += 7;
    }
}

fn fields(b: &[u8]) -> Vec<(u64, Field<'_>)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < b.len() {
        let key = varint(b, &mut pos);
        let f = match key & 7 {
            0 => Field::Varint(varint(b, &mut pos)),
            1 => {
                pos += 8;
                Field::Fixed64(b[pos - 8..pos].try_into().unwrap())
            }
            2 => {
                let n = varint(b, &mut pos) as usize;
                pos += n;
                Field::Bytes(&b[pos - n..pos])
            }
            5 => {
                pos += 4;
                Field::Fixed32(b[pos - 4..pos].try_into().unwrap())
            }
            w => panic!("unexpected wire type {w}"),
        };
        out.push((key >> 3, f));
    }
    out
}

fn string(b: &[u8]) -> String {
    String::from_utf8(b.to_vec()).unwrap()
}

/// Repeated doubles, packed (wire type 2) or not.
fn doubles(f: &Field<'_>) -> Vec<f64> {
    match f {
        Field::Fixed64(x) => vec![f64::from_le_bytes(*x)],
        Field::Bytes(b) => b.chunks(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
        _ => panic!("not a double"),
    }
}

fn histo(b: &[u8]) -> Payload {
    let (mut min, mut max, mut num, mut sum, mut sum_squares) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let (mut limits, mut counts) = (Vec::new(), Vec::new());
    for (n, f) in fields(b) {
        let d = doubles(&f);
        match n {
            1 => min = d[0],
            2 => max = d[0],
            3 => num = d[0],
            4 => sum = d[0],
            5 => sum_squares = d[0],
            6 => limits.extend(d),
            7 => counts.extend(d),
            _ => {}
        }
    }
    Payload::Histo {
        min,
        max,
        num,
        sum,
        sum_squares,
        limits,
        counts,
    }
}

fn value(b: &[u8]) -> Value {
    let (mut tag, mut payload, mut plugin, mut strings) = (String::new(), None, String::new(), Vec::new());
    for (n, f) in fields(b) {
        match (n, f) {
            (1, Field::Bytes(x)) => tag = string(x),
            (2, Field::Fixed32(x)) => payload = Some(Payload::Scalar(f32::from_le_bytes(x))),
            (5, Field::Bytes(x)) => payload = Some(histo(x)),
            (8, Field::Bytes(tensor)) => {
                for (n, f) in fields(tensor) {
                    if let (8, Field::Bytes(s)) = (n, f) {
                        strings.push(string(s));
                    }
                }
            }
            (9, Field::Bytes(meta)) => {
                for (n, f) in fields(meta) {
                    if let (1, Field::Bytes(pd)) = (n, f) {
                        for (n, f) in fields(pd) {
                            if let (1, Field::Bytes(name)) = (n, f) {
                                plugin = string(name);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let payload = payload.unwrap_or_else(|| Payload::Text {
        plugin,
        text: strings.concat(),
    });
    Value { tag, payload }
}

fn event(b: &[u8]) -> Event {
    let mut e = Event::default();
    for (n, f) in fields(b) {
        match (n, f) {
            (1, Field::Fixed64(x)) => e.wall_time = f64::from_le_bytes(x),
            (2, Field::Varint(x)) => e.step = x as i64,
            (3, Field::Bytes(x)) => e.file_version = Some(string(x)),
            (5, Field::Bytes(summary)) => {
                for (n, f) in fields(summary) {
                    if let (1, Field::Bytes(v)) = (n, f) {
                        e.values.push(value(v));
                    }
                }
            }
            (7, Field::Bytes(log)) => {
                for (n, f) in fields(log) {
                    if let (1, Field::Varint(s)) = (n, f) {
                        e.session_status = Some(s);
                    }
                }
            }
            _ => {}
        }
    }
    e
}

/// The framed records of `bytes` as (offset, data); panics on any framing or checksum error
/// (the files a finished or resumed run leaves must be whole).
pub fn records(bytes: &[u8], name: &str) -> Vec<(usize, Vec<u8>)> {
    let b = bytes;
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < b.len() {
        assert!(b.len() - pos >= 12, "{name}: truncated record at {pos}");
        let len = u64::from_le_bytes(b[pos..pos + 8].try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(b[pos + 8..pos + 12].try_into().unwrap());
        assert_eq!(len_crc, masked(&b[pos..pos + 8]), "{name}: length crc at {pos}");
        assert!(b.len() >= pos + 16 + len, "{name}: truncated record at {pos}");
        let data = &b[pos + 12..pos + 12 + len];
        let crc = u32::from_le_bytes(b[pos + 12 + len..pos + 16 + len].try_into().unwrap());
        assert_eq!(crc, masked(data), "{name}: data crc at {pos}");
        out.push((pos, data.to_vec()));
        pos += 16 + len;
    }
    out
}

/// Decodes one record's `Event`.
pub fn decode(data: &[u8]) -> Event {
    event(data)
}

/// The events of a file (see [`records`]).
pub fn read_file(path: &Path) -> Vec<Event> {
    let bytes = std::fs::read(path).unwrap();
    records(&bytes, &path.display().to_string())
        .iter()
        .map(|(_, d)| event(d))
        .collect()
}

/// The event files of a directory (TensorBoard's rule: `tfevents` in the name), sorted.
pub fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains("tfevents"))
        .collect();
    v.sort();
    v
}

/// Every event of a directory, file by file in name order; each file must start with the
/// `brain.Event:2` version event.
pub fn read_dir(dir: &Path) -> Vec<Event> {
    let mut out = Vec::new();
    for f in event_files(dir) {
        let events = read_file(&f);
        assert_eq!(
            events.first().and_then(|e| e.file_version.as_deref()),
            Some("brain.Event:2"),
            "{}",
            f.display()
        );
        out.extend(events);
    }
    out
}

#[test]
fn the_bitwise_crc_matches_the_castagnoli_check_value() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
}
