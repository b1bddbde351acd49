//! The CEL environment every expression runs in: the standard library, the strings
//! extension and Weir's own functions. `weir_crds::cel::FUNCTIONS` lists them all; the tests
//! below run every entry's example here.
//!
//! A function given a value of the wrong type, or a bad argument, returns an
//! `ExecutionError`, which makes the record a dead letter with that reason.

use std::fmt::Write as _;
use std::sync::{Arc, LazyLock};

use argon2::password_hash::PasswordHasher;
use cel::common::types::{CelInt, CelString, CelTimestamp};
use cel::{DeclarationError, Env, ExecutionError};
use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};

static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(build()));

/// The environment, built once.
pub fn env() -> Arc<Env> {
    Arc::clone(&ENV)
}

#[allow(
    clippy::expect_used,
    reason = "registration fails only on a duplicate overload, a bug every test would hit"
)]
fn build() -> Env {
    let mut env = Env::stdlib();
    env.add_extension(cel::extensions::strings)
        .expect("the strings extension registers");
    env.add_extension(weir).expect("Weir's functions register");
    env
}

fn weir(env: &mut Env) -> Result<(), DeclarationError> {
    cel::add_overload!(env, fn bcrypt_hash: (CelString, CelInt) -> Result<CelString>,
        name = "bcrypt")?;
    cel::add_overload!(env, fn argon2id_hash: (CelString) -> Result<CelString>,
        name = "argon2id")?;
    cel::add_overload!(env, fn sha256_hex: (CelString) -> CelString, name = "sha256")?;
    cel::add_overload!(env, fn hmac_sha256_hex: (CelString, CelString) -> CelString,
        name = "hmacSha256")?;
    cel::add_overload!(env, fn uuid_v7: () -> CelString, name = "uuid")?;
    // A member of `timestamp`: overloads dispatch on the receiver's type, so this and the
    // strings extension's `string.format(list)` coexist.
    cel::add_member_overload!(env, fn format_timestamp: (CelTimestamp, CelString) -> Result<CelString>,
        name = "format")?;
    Ok(())
}

// Above 16 one hash takes seconds: a typo there would stall the pipeline, not protect it.
const BCRYPT_COSTS: std::ops::RangeInclusive<i64> = 4..=16;

fn bcrypt_hash(value: &CelString<'_>, cost: &CelInt) -> Result<CelString<'static>, ExecutionError> {
    let cost = *cost.inner();
    let cost = u32::try_from(cost)
        .ok()
        .filter(|_| BCRYPT_COSTS.contains(&cost))
        .ok_or_else(|| {
            ExecutionError::function_error(
                "bcrypt",
                format!(
                    "cost must be from {} to {}, got {cost}",
                    BCRYPT_COSTS.start(),
                    BCRYPT_COSTS.end()
                ),
            )
        })?;
    // Refuses 72 bytes or more rather than hashing only the first 72.
    bcrypt::non_truncating_hash(value.inner(), cost)
        .map(CelString::from)
        .map_err(|e| ExecutionError::function_error("bcrypt", e))
}

fn argon2id_hash(value: &CelString<'_>) -> Result<CelString<'static>, ExecutionError> {
    let hash: argon2::PasswordHash = argon2::Argon2::default()
        .hash_password(value.inner().as_bytes())
        .map_err(|e| ExecutionError::function_error("argon2id", e))?;
    Ok(CelString::from(hash.to_string()))
}

fn sha256_hex(value: &CelString<'_>) -> CelString<'static> {
    CelString::from(hex(&Sha256::digest(value.inner().as_bytes())))
}

fn hmac_sha256_hex(key: &CelString<'_>, value: &CelString<'_>) -> CelString<'static> {
    // HMAC takes a key of any length: `new_from_slice` never fails for it.
    let Ok(mut mac) = hmac::Hmac::<Sha256>::new_from_slice(key.inner().as_bytes()) else {
        return CelString::from(String::new());
    };
    mac.update(value.inner().as_bytes());
    CelString::from(hex(&mac.finalize().into_bytes()))
}

fn uuid_v7() -> CelString<'static> {
    CelString::from(uuid::Uuid::now_v7().to_string())
}

fn format_timestamp(
    ts: &CelTimestamp,
    layout: &CelString<'_>,
) -> Result<CelString<'static>, ExecutionError> {
    let mut out = String::new();
    // Writing, rather than `to_string`, turns an unknown `%` directive into an error
    // instead of a panic.
    write!(out, "{}", ts.inner().to_utc().format(layout.inner())).map_err(|_| {
        ExecutionError::function_error(
            "format",
            format!("{:?} is not a strftime layout", layout.inner()),
        )
    })?;
    Ok(CelString::from(out))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Record;
    use crate::transform::{Expression, context};
    use argon2::password_hash::PasswordVerifier;
    use serde_json::json;
    use weir_crds::cel::{Expected, FUNCTIONS};

    fn run(source: &str) -> Result<cel::Value, ExecutionError> {
        let program = env().compile(source).expect("compiles with the worker env");
        let record = Record {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: None,
            payload: None,
            timestamp: None,
            headers: Vec::new(),
        };
        let context = context(&record, &json!({})).expect("context");
        program.execute(&context)
    }

    fn string(source: &str) -> String {
        match run(source) {
            Ok(cel::Value::String(s)) => s.to_string(),
            other => panic!("{source}: expected a string, got {other:?}"),
        }
    }

    /// The table is the worker's function table: every entry runs here as its example says.
    #[test]
    fn every_table_example_evaluates_to_its_expected_result() {
        for f in FUNCTIONS {
            match f.expected {
                Expected::Value(expected) => {
                    let expected = run(expected).expect("the expected result evaluates");
                    assert_eq!(run(f.example), Ok(expected), "{}: {}", f.name, f.example);
                }
                Expected::Varies(_) => match f.name {
                    "bcrypt" => bcrypt_example_verifies(f.example),
                    "argon2id" => argon2id_example_verifies(f.example),
                    "uuid" => uuids_are_version_7_and_ordered(f.example),
                    other => panic!("no test for the varying result of {other}"),
                },
            }
        }
    }

    fn bcrypt_example_verifies(example: &str) {
        let hash = string(example);
        assert!(hash.starts_with("$2b$04$"), "{hash}");
        assert!(bcrypt::verify("s3cret", &hash).is_ok_and(|ok| ok), "{hash}");
        assert_ne!(hash, string(example), "a random salt each time");
    }

    fn argon2id_example_verifies(example: &str) {
        let hash = string(example);
        assert!(hash.starts_with("$argon2id$v=19$"), "{hash}");
        let parsed = argon2::PasswordHash::new(&hash).expect("a PHC string");
        assert!(
            argon2::Argon2::default()
                .verify_password(b"s3cret", &parsed)
                .is_ok()
        );
        assert!(
            argon2::Argon2::default()
                .verify_password(b"other", &parsed)
                .is_err()
        );
    }

    fn uuids_are_version_7_and_ordered(example: &str) {
        let first = uuid::Uuid::parse_str(&string(example)).expect("a UUID");
        let second = uuid::Uuid::parse_str(&string(example)).expect("a UUID");
        assert_eq!(first.get_version_num(), 7);
        assert_eq!(second.get_version_num(), 7);
        assert!(first < second, "{first} then {second}");
        assert!(first.to_string() < second.to_string());
    }

    #[test]
    fn a_name_outside_the_table_is_refused_by_check_and_evaluation() {
        for source in ["nosuch(1)", "'a'.nosuch()", "max(1, 2)", "lowerAscii('A')"] {
            assert!(weir_crds::cel::check(source).is_err(), "{source}");
            assert!(Expression::compile(source).is_err(), "{source}");
            assert!(run(source).is_err(), "{source}");
        }
    }

    fn error(source: &str) -> String {
        match run(source) {
            Err(e) => e.to_string(),
            Ok(v) => panic!("{source}: expected an error, got {v:?}"),
        }
    }

    #[test]
    fn bad_arguments_are_errors_not_panics() {
        let e = error("bcrypt('x', 3)");
        assert!(e.contains("cost must be from 4 to 16, got 3"), "{e}");
        assert!(error("bcrypt('x', 99999999999)").contains("from 4 to 16"));
        assert!(error("bcrypt('x', -1)").contains("from 4 to 16"));
        assert!(error(&format!("bcrypt('{}', 4)", "a".repeat(72))).contains("bcrypt"));
        for wrong_type in [
            "bcrypt(1, 10)",
            "bcrypt('x', '10')",
            "argon2id(null)",
            "sha256(b'abc')",
            "hmacSha256('k', 1)",
            "uuid('x')",
            "'%s'.format('not a list')",
            "timestamp('2024-05-06T07:08:09Z').format(1)",
        ] {
            assert!(
                error(wrong_type).contains("no matching overload"),
                "{wrong_type}"
            );
        }
        let e = error("timestamp('2024-05-06T07:08:09Z').format('%Y %Q')");
        assert!(e.contains("not a strftime layout"), "{e}");
    }

    #[test]
    fn hashes_are_lowercase_hex_of_known_vectors() {
        assert_eq!(
            string("sha256('')"),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // RFC 4231, test case 2.
        assert_eq!(
            string("hmacSha256('Jefe', 'what do ya want for nothing?')"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn the_strings_format_and_the_timestamp_format_coexist() {
        assert_eq!(string("'%s-%d'.format(['a', 1])"), "a-1");
        assert_eq!(
            string("timestamp('2024-05-06T07:08:09+02:00').format('%H:%M %z')"),
            "05:08 +0000"
        );
    }
}
