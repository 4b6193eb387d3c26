//! Per-user storage quotas: records and bytes of the projection, fields
//! per record.
//!
//! A push is refused whole when it would take its user over a limit, with
//! two exceptions that keep honest devices going: a batch that only
//! deletes records that exist is always accepted (a device over quota can
//! still delete; deletes are soft and free nothing, but refusing them would
//! strand the device's queue; a delete of a record never seen makes a
//! tombstone, and counts like any other change), and a push that does not
//! grow what a limit counts is accepted even when the user is already over
//! it (data stored before the limit was lowered stays editable).
//!
//! Nothing here touches HTTP or SQL: the store counts, this decides.

use crate::config::Config;
use crate::error::{Error, ErrorCode};

/// What a user stores in the projection: records, and their bytes (table
/// name, record id and state as stored; see [`stored_bytes`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub records: i64,
    pub bytes: i64,
}

/// The bytes a record counts for: its key and its state's JSON as stored.
pub fn stored_bytes(table: &str, id: &str, state_len: usize) -> i64 {
    (table.len() + id.len() + state_len) as i64
}

/// A limit a push can go over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Records,
    Bytes,
    Fields,
}

impl Limit {
    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Records => "records",
            Limit::Bytes => "bytes",
            Limit::Fields => "fields",
        }
    }

    /// The error code a refusal carries.
    pub fn code(self) -> ErrorCode {
        match self {
            Limit::Records => ErrorCode::QuotaRecords,
            Limit::Bytes => ErrorCode::QuotaBytes,
            Limit::Fields => ErrorCode::QuotaFields,
        }
    }

    /// The setting that sets it.
    pub fn setting(self) -> &'static str {
        match self {
            Limit::Records => "MAX_RECORDS_PER_USER",
            Limit::Bytes => "MAX_BYTES_PER_USER",
            Limit::Fields => "MAX_FIELDS_PER_RECORD",
        }
    }
}

/// The limits, from the configuration (0: no limit).
#[derive(Clone, Copy, Debug)]
pub struct Quotas {
    pub max_records: u64,
    pub max_bytes: u64,
    pub max_fields: u64,
}

impl Quotas {
    /// No limit at all.
    pub const NONE: Quotas = Quotas {
        max_records: 0,
        max_bytes: 0,
        max_fields: 0,
    };

    /// The limits the configuration sets.
    pub fn of(config: &Config) -> Quotas {
        Quotas {
            max_records: config.max_records_per_user,
            max_bytes: config.max_bytes_per_user,
            max_fields: config.max_fields_per_record,
        }
    }

    /// Whether a push that takes the user's usage from `before` to `after`
    /// may be recorded (`deletes_only`: the batch only deletes records
    /// that exist).
    pub fn admit(&self, before: Usage, after: Usage, deletes_only: bool) -> Result<(), Error> {
        if deletes_only {
            return Ok(());
        }
        over(
            Limit::Records,
            self.max_records,
            before.records,
            after.records,
            "records",
        )?;
        over(
            Limit::Bytes,
            self.max_bytes,
            before.bytes,
            after.bytes,
            "bytes of records",
        )
    }

    /// Whether a record that had `before` fields may have `after` once the
    /// push is folded in.
    pub fn admit_fields(
        &self,
        table: &str,
        id: &str,
        before: usize,
        after: usize,
        deletes_only: bool,
    ) -> Result<(), Error> {
        if deletes_only {
            return Ok(());
        }
        over(
            Limit::Fields,
            self.max_fields,
            before as i64,
            after as i64,
            &format!("fields in record {table}/{id}"),
        )
    }
}

/// Refuses growth that ends over a limit (`max` 0: none).
fn over(limit: Limit, max: u64, before: i64, after: i64, what: &str) -> Result<(), Error> {
    if max == 0 || after <= before || after <= i64::try_from(max).unwrap_or(i64::MAX) {
        return Ok(());
    }
    Err(Error::OverQuota {
        code: limit.code(),
        limit: limit.name(),
        message: format!(
            "the push would bring this user's {what} to {after}, over {} ({max}); nothing was recorded (deletes are still accepted)",
            limit.setting()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Quotas = Quotas {
        max_records: 10,
        max_bytes: 1000,
        max_fields: 5,
    };

    fn usage(records: i64, bytes: i64) -> Usage {
        Usage { records, bytes }
    }

    fn refused(result: Result<(), Error>) -> Option<Limit> {
        match result {
            Ok(()) => None,
            Err(Error::OverQuota { code, limit, message }) => {
                let limit = [Limit::Records, Limit::Bytes, Limit::Fields]
                    .into_iter()
                    .find(|l| l.name() == limit)
                    .unwrap();
                assert_eq!(code, limit.code());
                assert!(message.contains(limit.setting()), "{message}");
                Some(limit)
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn growth_up_to_a_limit_passes_and_past_it_is_refused_by_name() {
        assert_eq!(refused(LIMITS.admit(usage(9, 900), usage(10, 1000), false)), None);
        assert_eq!(
            refused(LIMITS.admit(usage(9, 900), usage(11, 950), false)),
            Some(Limit::Records)
        );
        assert_eq!(
            refused(LIMITS.admit(usage(9, 900), usage(9, 1001), false)),
            Some(Limit::Bytes)
        );
        assert_eq!(refused(LIMITS.admit_fields("t", "a", 5, 5, false)), None);
        assert_eq!(refused(LIMITS.admit_fields("t", "a", 5, 6, false)), Some(Limit::Fields));
    }

    #[test]
    fn deletes_pass_over_quota() {
        assert_eq!(refused(LIMITS.admit(usage(10, 1000), usage(12, 1100), true)), None);
        assert_eq!(refused(LIMITS.admit_fields("t", "a", 5, 6, true)), None);
    }

    #[test]
    fn what_does_not_grow_passes_over_a_lowered_limit() {
        assert_eq!(refused(LIMITS.admit(usage(20, 5000), usage(20, 5000), false)), None);
        assert_eq!(refused(LIMITS.admit(usage(20, 5000), usage(20, 4000), false)), None);
        assert_eq!(
            refused(LIMITS.admit(usage(20, 5000), usage(20, 5001), false)),
            Some(Limit::Bytes)
        );
        assert_eq!(refused(LIMITS.admit_fields("t", "a", 9, 9, false)), None);
    }

    #[test]
    fn zero_is_no_limit() {
        assert_eq!(
            refused(Quotas::NONE.admit(usage(0, 0), usage(i64::MAX, i64::MAX), false)),
            None
        );
        assert_eq!(refused(Quotas::NONE.admit_fields("t", "a", 0, 100_000, false)), None);
    }
}
