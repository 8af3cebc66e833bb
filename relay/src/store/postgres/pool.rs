//! A small pool of connections, each with its own prepared statements.
//!
//! The relay calls the store from its core's thread and, for read-only queries, from tokio's blocking pool at
//! the same time: each caller takes a connection of its own, so the core never waits behind someone's long
//! read. The pool is capped (several nodes share the server's `max_connections`); a caller that finds every
//! connection busy waits for one.
//!
//! A connection that broke (the server restarted, the network dropped it) is never handed out again: the call
//! that found it broken returns its error, and every idle connection is dropped with it, since they were
//! most likely opened to the same server that just went away. The next call connects afresh, so the relay
//! recovers by itself when PostgreSQL is back.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};

use postgres::types::ToSql;
use postgres::{Client, Row, SimpleQueryMessage, Statement};

use super::tls::Target;
use crate::store::{Result, StoreError};

/// Connections open at once, at most, per store (per relay node).
pub(super) const DEFAULT_SIZE: usize = 16;

pub(super) struct Pool {
    target: Target,
    size: usize,
    state: Mutex<State>,
    /// Signalled whenever a connection is returned or given up, for callers waiting for one.
    freed: Condvar,
}

struct State {
    idle: Vec<Conn>,
    /// Connections that exist: idle ones and those lent out.
    open: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("Pool")
            .field("hosts", &self.target.config.get_hosts())
            .field("dbname", &self.target.config.get_dbname())
            .field("tls", &self.target.mode)
            .field("size", &self.size)
            .field("open", &state.open)
            .field("idle", &state.idle.len())
            .finish()
    }
}

impl Pool {
    pub(super) fn new(target: Target, size: usize) -> Self {
        Self {
            target,
            size: size.max(1),
            state: Mutex::new(State {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection for one operation: an idle one, a new one, or the next one returned.
    pub(super) fn get(&self) -> Result<Lease<'_>> {
        let mut state = self.lock();
        loop {
            if let Some(conn) = state.idle.pop() {
                if conn.client.is_closed() {
                    // The server closed it while it was idle (a restart or a crash): connect afresh rather
                    // than fail a call on it, and so that a write is never attempted where it cannot land.
                    state.open -= 1;
                    continue;
                }
                return Ok(Lease {
                    pool: self,
                    conn: Some(conn),
                });
            }
            if state.open < self.size {
                state.open += 1;
                break;
            }
            state = self.freed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        drop(state);
        // Connected outside the lock: a server that is slow to answer holds up only this caller.
        match self.connect() {
            Ok(conn) => Ok(Lease {
                pool: self,
                conn: Some(conn),
            }),
            Err(e) => {
                self.lock().open -= 1;
                self.freed.notify_one();
                Err(e)
            }
        }
    }

    fn connect(&self) -> Result<Conn> {
        let mut client = self.target.connect()?;
        // Every write commits on its own without waiting for the WAL to reach the disk; `Store::flush` waits
        // for it once for all of them (see `PgStore::flush`).
        //
        // A transaction here never waits on anything but the server between its statements, so one that sits
        // idle is a node that died or lost the network in the middle of it. Without a limit, the server would
        // keep its locks (the audit counter's row: every node's audited writes) until TCP gives up on it,
        // hours later by default.
        //
        // And the server's incarnation: see "Crashes" in the store's documentation.
        let replies = client.simple_query(
            "SET synchronous_commit = off;
             SET idle_in_transaction_session_timeout = '30s';
             INSERT INTO ct_incarnation (token) VALUES (gen_random_uuid()::text) ON CONFLICT DO NOTHING;
             SELECT token FROM ct_incarnation;",
        )?;
        let incarnation = replies
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
                _ => None,
            })
            .ok_or_else(|| StoreError::Schema("ct_incarnation holds no token".into()))?;
        Ok(Conn {
            client,
            statements: HashMap::new(),
            in_transaction: false,
            incarnation,
        })
    }

    fn give_back(&self, conn: Conn) {
        let mut state = self.lock();
        if conn.client.is_closed() || conn.in_transaction {
            // Broken, or left in a transaction by a panic: never lent again. Its idle siblings most likely
            // talk to the same server that just went away; a call on one of them would only fail in turn.
            tracing::warn!(
                dropped = 1 + state.idle.len(),
                "PostgreSQL connection lost: the next call connects again"
            );
            state.open -= 1 + state.idle.len();
            state.idle.clear();
            drop(state);
            self.freed.notify_all();
            return;
        }
        state.idle.push(conn);
        drop(state);
        self.freed.notify_one();
    }
}

/// One connection and the statements prepared on it.
pub(super) struct Conn {
    client: Client,
    /// Prepared once per connection: a statement then costs one round trip instead of two.
    statements: HashMap<&'static str, Statement>,
    /// Set between `BEGIN` and its end, so that a connection left in a transaction is not reused.
    in_transaction: bool,
    /// The token of the server's run this connection was opened to (`ct_incarnation`).
    incarnation: String,
}

impl Conn {
    pub(super) fn incarnation(&self) -> &str {
        &self.incarnation
    }

    fn statement(&mut self, sql: &'static str) -> Result<Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    pub(super) fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        let s = self.statement(sql)?;
        Ok(self.client.query(&s, params)?)
    }

    pub(super) fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>> {
        let s = self.statement(sql)?;
        Ok(self.client.query_opt(&s, params)?)
    }

    pub(super) fn query_one(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row> {
        let s = self.statement(sql)?;
        Ok(self.client.query_one(&s, params)?)
    }

    /// Rows changed.
    pub(super) fn execute(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64> {
        let s = self.statement(sql)?;
        Ok(self.client.execute(&s, params)?)
    }

    /// Statements that take no parameters, sent as one simple query (one round trip for all of them).
    pub(super) fn batch(&mut self, sql: &str) -> Result<()> {
        Ok(self.client.batch_execute(sql)?)
    }

    /// Runs `f` in a transaction: committed if it returns `Ok`, rolled back if it returns `Err`.
    pub(super) fn transaction<T>(&mut self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        self.client.batch_execute("BEGIN")?;
        self.in_transaction = true;
        let out = f(self);
        let end = if out.is_ok() { "COMMIT" } else { "ROLLBACK" };
        // A failed COMMIT or ROLLBACK leaves `in_transaction` set: the connection is given up.
        self.client.batch_execute(end)?;
        self.in_transaction = false;
        out
    }
}

/// A connection lent to one operation, returned to the pool when dropped.
pub(super) struct Lease<'a> {
    pool: &'a Pool,
    conn: Option<Conn>,
}

impl std::ops::Deref for Lease<'_> {
    type Target = Conn;

    fn deref(&self) -> &Conn {
        self.conn
            .as_ref()
            .expect("a lease holds its connection until dropped")
    }
}

impl std::ops::DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn
            .as_mut()
            .expect("a lease holds its connection until dropped")
    }
}

impl Drop for Pool {
    /// The `postgres` crate's client closes its connection by running a small runtime of its own, which
    /// panics on a thread that is running async code ("Cannot start a runtime from within a runtime"). The
    /// last handle on a store can be dropped there (the group commit's, when the relay stops), so the idle
    /// connections are closed on a thread of their own.
    fn drop(&mut self) {
        let idle = std::mem::take(&mut self.lock().idle);
        if idle.is_empty() {
            return;
        }
        if tokio::runtime::Handle::try_current().is_err() {
            drop(idle);
            return;
        }
        let slot = std::sync::Arc::new(Mutex::new(Some(idle)));
        let theirs = slot.clone();
        let closer = std::thread::Builder::new()
            .name("ct-pg-close".into())
            .spawn(move || drop(theirs.lock().unwrap_or_else(|p| p.into_inner()).take()));
        if let Err(e) = closer {
            // No thread to close them on: leak them rather than panic here; the server sees the sockets
            // close when the process exits.
            std::mem::forget(slot.lock().unwrap_or_else(|p| p.into_inner()).take());
            tracing::warn!(error = %e, "could not close the database connections cleanly");
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.give_back(conn);
        }
    }
}
