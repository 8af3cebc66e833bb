//! The dashboard's sign-in links and sessions, on the table of `relay/migrations/0006_web_sessions.sql`.
//! Called from the `Store` implementation in `mod.rs`.
//!
//! Every operation is one statement but a touch, which reads the record to write its new `last_seen` and
//! holds the row from the read to the write. Spending a link is a `DELETE ... RETURNING`: of two nodes
//! spending it at once, the second waits for the first's row lock, then finds nothing to delete.

use super::{bodies, body, count, int, unsigned, PgStore};
use crate::store::{Result, WebSessionKind, WebSessionRecord};

impl PgStore {
    pub(super) fn put_web_session_(&self, rec: &WebSessionRecord) -> Result<()> {
        let value = serde_json::to_vec(rec)?;
        self.write(|c| {
            c.execute(
                "INSERT INTO ct_web_sessions (hash, kind, user_id, public_id, created_at, ends_at, body)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (hash) DO UPDATE SET
                     kind = excluded.kind, user_id = excluded.user_id, public_id = excluded.public_id,
                     created_at = excluded.created_at, ends_at = excluded.ends_at, body = excluded.body",
                &[
                    &rec.hash,
                    &rec.kind.as_str(),
                    &rec.user,
                    &rec.id,
                    &int(rec.created_at),
                    &int(rec.ends_at()),
                    &value,
                ],
            )
        })?;
        Ok(())
    }

    pub(super) fn web_session_(&self, hash: &str, now: u64) -> Result<Option<WebSessionRecord>> {
        let row = self.read(|c| {
            c.query_opt(
                "SELECT body FROM ct_web_sessions WHERE hash = $1 AND ends_at > $2",
                &[&hash, &int(now)],
            )
        })?;
        row.map(|r| body(&r)).transpose()
    }

    pub(super) fn take_web_session_(
        &self,
        hash: &str,
        kind: WebSessionKind,
        now: u64,
    ) -> Result<Option<WebSessionRecord>> {
        let row = self.write(|c| {
            c.query_opt(
                "DELETE FROM ct_web_sessions WHERE hash = $1 AND kind = $2 AND ends_at > $3 RETURNING body",
                &[&hash, &kind.as_str(), &int(now)],
            )
        })?;
        row.map(|r| body(&r)).transpose()
    }

    /// Not counted as a write that a crash may lose ([`PgStore::passing_write`]): losing one only makes a
    /// session look unused a little longer, and it is written again on the next request.
    pub(super) fn touch_web_session_(
        &self,
        hash: &str,
        now: u64,
    ) -> Result<Option<WebSessionRecord>> {
        self.passing_write(|c| {
            c.transaction(|c| {
                let Some(row) = c.query_opt(
                    "SELECT body FROM ct_web_sessions WHERE hash = $1 AND ends_at > $2 FOR UPDATE",
                    &[&hash, &int(now)],
                )?
                else {
                    return Ok(None);
                };
                let mut rec: WebSessionRecord = body(&row)?;
                if now > rec.last_seen {
                    rec.last_seen = now;
                    c.execute(
                        "UPDATE ct_web_sessions SET ends_at = $2, body = $3 WHERE hash = $1",
                        &[&hash, &int(rec.ends_at()), &serde_json::to_vec(&rec)?],
                    )?;
                }
                Ok(Some(rec))
            })
        })
    }

    pub(super) fn web_sessions_of_(&self, user: &str, now: u64) -> Result<Vec<WebSessionRecord>> {
        bodies(&self.read(|c| {
            c.query(
                "SELECT body FROM ct_web_sessions WHERE user_id = $1 AND ends_at > $2
                 ORDER BY created_at, hash",
                &[&user, &int(now)],
            )
        })?)
    }

    pub(super) fn delete_web_session_(&self, user: &str, id: &str) -> Result<bool> {
        let n = self.write(|c| {
            c.execute(
                "DELETE FROM ct_web_sessions WHERE user_id = $1 AND public_id = $2",
                &[&user, &id],
            )
        })?;
        Ok(n > 0)
    }

    pub(super) fn delete_web_sessions_of_(&self, user: &str, now: u64) -> Result<usize> {
        let row = self.write(|c| {
            c.query_one(
                "WITH gone AS (DELETE FROM ct_web_sessions WHERE user_id = $1 RETURNING kind, ends_at)
                 SELECT count(*) FILTER (WHERE kind = $2 AND ends_at > $3) FROM gone",
                &[&user, &WebSessionKind::Session.as_str(), &int(now)],
            )
        })?;
        Ok(unsigned(row.try_get(0)?, "count")? as usize)
    }

    pub(super) fn prune_web_sessions_(&self, now: u64) -> Result<usize> {
        let n = self.write(|c| {
            c.execute(
                "DELETE FROM ct_web_sessions WHERE ends_at <= $1",
                &[&int(now)],
            )
        })?;
        Ok(count(n))
    }
}
