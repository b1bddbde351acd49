//! What a `read_committed` consumer receives of a fetched log range: the data records,
//! without the control batches (the commit and abort markers transactions leave) and
//! without the records of aborted transactions. Pure: it reads the record batch headers
//! (message format v2, Kafka 0.11 and later) of a Fetch answer, never decompresses, and is
//! tested with batches built here.
//!
//! The rule is the one Kafka's own consumer applies: an aborted transaction of producer P
//! starting at offset F (the Fetch answer lists them) makes P's transactional batches from
//! F on invisible, until P's abort marker; control batches are never delivered.

/// The bytes of a v2 record batch header, up to and including the record count.
const HEADER: usize = 61;
/// Bits of a batch's attributes.
const COMPRESSION: i16 = 0x07;
const TRANSACTIONAL: i16 = 0x10;
const CONTROL: i16 = 0x20;
/// The control record type of an abort marker (a commit marker is 1).
const ABORT_MARKER: i16 = 0;

/// An aborted transaction in a Fetch answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Aborted {
    pub producer_id: i64,
    pub first_offset: i64,
}

/// The records a `read_committed` consumer receives in `[from, until)` of the batches read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counted {
    /// Data records of committed (or non-transactional) batches.
    pub records: i64,
    /// The offset up to which the batches were read: `until`, or less when the bytes
    /// fetched ended before it (the last stable offset of an open transaction, or the
    /// fetch's size bound).
    pub reached: i64,
}

/// One batch header.
#[derive(Clone, Copy, Debug)]
struct Batch {
    base: i64,
    last: i64,
    attributes: i16,
    producer_id: i64,
    count: i64,
}

/// Counts the records of `bytes` (the `records` of one partition in a `read_committed`
/// Fetch answer fetched from `from`) in `[from, until)`. `None` when the bytes are not
/// v2 record batches (a log still holding the pre-0.11 format): the caller then counts
/// offsets instead.
pub fn count(bytes: &[u8], aborted: &[Aborted], from: i64, until: i64) -> Option<Counted> {
    let mut pending: Vec<Aborted> = aborted.to_vec();
    pending.sort_by_key(|a| a.first_offset);
    let mut pending = pending.into_iter().peekable();
    let mut aborting: Vec<i64> = Vec::new();
    let mut records = 0;
    let mut reached = from;
    let mut rest = bytes;
    while rest.len() >= HEADER {
        let length = i32::from_be_bytes(rest[8..12].try_into().ok()?);
        let size = 12 + usize::try_from(length).ok()?;
        if size < HEADER {
            return None;
        }
        if rest[16] != 2 {
            return None;
        }
        // The answer may end in a partial batch: what is missing is not counted here.
        if rest.len() < size {
            break;
        }
        let batch = header(rest)?;
        let body = &rest[HEADER..size];
        rest = &rest[size..];
        if batch.base >= until {
            break;
        }
        reached = reached.max((batch.last + 1).min(until));
        if batch.last < from {
            continue;
        }
        while let Some(a) = pending.next_if(|a| a.first_offset <= batch.last) {
            aborting.push(a.producer_id);
        }
        if batch.attributes & CONTROL != 0 {
            // An abort marker ends its producer's aborted transaction.
            if is_abort_marker(batch, body) {
                aborting.retain(|p| *p != batch.producer_id);
            }
            continue;
        }
        if batch.attributes & TRANSACTIONAL != 0 && aborting.contains(&batch.producer_id) {
            continue;
        }
        records += in_range(batch, from, until);
    }
    Some(Counted { records, reached })
}

fn header(bytes: &[u8]) -> Option<Batch> {
    let i64_at = |at: usize| {
        bytes
            .get(at..at + 8)
            .map(|b| i64::from_be_bytes(b.try_into().unwrap_or_default()))
    };
    let i32_at = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| i32::from_be_bytes(b.try_into().unwrap_or_default()))
    };
    let i16_at = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| i16::from_be_bytes(b.try_into().unwrap_or_default()))
    };
    let base = i64_at(0)?;
    Some(Batch {
        base,
        last: base + i64::from(i32_at(23)?),
        attributes: i16_at(21)?,
        producer_id: i64_at(43)?,
        count: i64::from(i32_at(57)?),
    })
}

/// The records of `batch` with offsets in `[from, until)`. A batch holds its offsets
/// contiguously unless compaction removed some; then the share inside the range is
/// bounded by the batch's record count.
fn in_range(batch: Batch, from: i64, until: i64) -> i64 {
    let first = batch.base.max(from);
    let last = batch.last.min(until - 1);
    if last < first {
        return 0;
    }
    (last - first + 1).min(batch.count)
}

/// Whether a control batch is an abort marker: its one record's key is
/// `(version: i16, type: i16)`, type 0 for abort. Control batches are written
/// uncompressed; one that is not is taken as the marker of the transaction it ends.
fn is_abort_marker(batch: Batch, body: &[u8]) -> bool {
    if batch.attributes & COMPRESSION != 0 {
        return true;
    }
    control_type(body).is_none_or(|t| t == ABORT_MARKER)
}

/// The control type of the first record of a batch body: a record is its length
/// (varint), attributes (i8), timestamp delta (varlong), offset delta (varint), key
/// length (varint) and key.
fn control_type(body: &[u8]) -> Option<i16> {
    let mut at = 0;
    varint(body, &mut at)?;
    at += 1;
    varint(body, &mut at)?;
    varint(body, &mut at)?;
    let key_length = varint(body, &mut at)?;
    if key_length < 4 {
        return None;
    }
    let key = body.get(at..at + 4)?;
    Some(i16::from_be_bytes([key[2], key[3]]))
}

/// A zigzag varint, as record fields are encoded.
fn varint(bytes: &[u8], at: &mut usize) -> Option<i64> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(((value >> 1) as i64) ^ -((value & 1) as i64));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_varint(out: &mut Vec<u8>, value: i64) {
        let mut v = ((value << 1) ^ (value >> 63)) as u64;
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    /// A v2 batch of `count` records from `base` (uncompressed; the CRC is not checked
    /// here, so it is left 0).
    fn batch(
        base: i64,
        count: i32,
        attributes: i16,
        producer_id: i64,
        marker: Option<i16>,
    ) -> Vec<u8> {
        let mut records = Vec::new();
        for i in 0..count {
            let mut record = vec![0u8];
            put_varint(&mut record, 0);
            put_varint(&mut record, i64::from(i));
            match marker {
                Some(kind) => {
                    put_varint(&mut record, 4);
                    record.extend_from_slice(&0i16.to_be_bytes());
                    record.extend_from_slice(&kind.to_be_bytes());
                    put_varint(&mut record, 6);
                    record.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
                }
                None => {
                    put_varint(&mut record, -1);
                    put_varint(&mut record, 2);
                    record.extend_from_slice(b"{}");
                }
            }
            put_varint(&mut record, 0);
            put_varint(&mut records, record.len() as i64);
            records.extend_from_slice(&record);
        }
        let mut out = Vec::new();
        out.extend_from_slice(&base.to_be_bytes());
        out.extend_from_slice(&((HEADER - 12 + records.len()) as i32).to_be_bytes());
        out.extend_from_slice(&0i32.to_be_bytes());
        out.push(2);
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&attributes.to_be_bytes());
        out.extend_from_slice(&(count - 1).to_be_bytes());
        out.extend_from_slice(&0i64.to_be_bytes());
        out.extend_from_slice(&0i64.to_be_bytes());
        out.extend_from_slice(&producer_id.to_be_bytes());
        out.extend_from_slice(&0i16.to_be_bytes());
        out.extend_from_slice(&0i32.to_be_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        out.extend_from_slice(&records);
        out
    }

    const TXN: i16 = TRANSACTIONAL;
    const MARKER: i16 = TRANSACTIONAL | CONTROL;

    /// Producer 7: a committed transaction (offsets 0–2, marker 3), an aborted one (4–5,
    /// marker 6), a committed one (7, marker 8); a plain record (9) of producer -1.
    fn log() -> Vec<u8> {
        [
            batch(0, 3, TXN, 7, None),
            batch(3, 1, MARKER, 7, Some(1)),
            batch(4, 2, TXN, 7, None),
            batch(6, 1, MARKER, 7, Some(ABORT_MARKER)),
            batch(7, 1, TXN, 7, None),
            batch(8, 1, MARKER, 7, Some(1)),
            batch(9, 1, 0, -1, None),
        ]
        .concat()
    }

    const ABORTED: [Aborted; 1] = [Aborted {
        producer_id: 7,
        first_offset: 4,
    }];

    #[test]
    fn markers_and_aborted_records_are_not_counted() {
        let log = log();
        assert_eq!(
            count(&log, &ABORTED, 0, 10),
            Some(Counted {
                records: 5,
                reached: 10
            })
        );
        // Consumed past the first transaction's records: its marker is all that is left of it.
        assert_eq!(count(&log, &ABORTED, 3, 10).map(|c| c.records), Some(2));
        // Consumed up to the aborted transaction: of what follows only offset 7 is delivered.
        assert_eq!(
            count(
                &log[..log.len() - batch(9, 1, 0, -1, None).len()],
                &ABORTED,
                3,
                9
            )
            .map(|c| c.records),
            Some(1)
        );
        assert_eq!(
            count(&log, &ABORTED, 8, 9),
            Some(Counted {
                records: 0,
                reached: 9
            })
        );
        assert_eq!(count(&log, &ABORTED, 4, 7).map(|c| c.records), Some(0));
    }

    #[test]
    fn a_batch_straddling_the_range_counts_its_share() {
        let log = log();
        // Committed at 1, inside the first batch; read up to 8 (a record arrived since).
        assert_eq!(
            count(&log, &ABORTED, 1, 8),
            Some(Counted {
                records: 2 + 1,
                reached: 8
            })
        );
    }

    #[test]
    fn an_answer_cut_inside_a_batch_reaches_the_last_whole_one() {
        let log = log();
        let whole = [batch(0, 3, TXN, 7, None), batch(3, 1, MARKER, 7, Some(1))].concat();
        let cut = &log[..whole.len() + 20];
        assert_eq!(
            count(cut, &ABORTED, 0, 10),
            Some(Counted {
                records: 3,
                reached: 4
            })
        );
        assert_eq!(
            count(&[], &[], 5, 9),
            Some(Counted {
                records: 0,
                reached: 5
            })
        );
    }

    #[test]
    fn without_the_abort_in_the_answer_the_transaction_counts() {
        // The same bytes under read_uncommitted (no aborted list): aborted records count.
        assert_eq!(count(&log(), &[], 0, 10).map(|c| c.records), Some(7));
    }

    #[test]
    fn an_old_message_format_is_not_guessed() {
        let mut log = log();
        log[16] = 1;
        assert_eq!(count(&log, &[], 0, 10), None);
    }
}
