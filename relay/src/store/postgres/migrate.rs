//! The schema's versions, embedded in the binary and applied at open.
//!
//! Each migration is a file `relay/migrations/NNNN_name.sql`, applied once, in order, each in its own
//! transaction together with its row in `ct_schema_migrations`: a migration is applied entirely or not at
//! all. Nodes of a cluster start at the same time, so the whole check-and-apply runs under an advisory lock:
//! the first node migrates, the others wait, then find nothing left to do.
//!
//! A database that a newer ct-relay migrated further than this binary knows is refused: this binary's queries
//! were written for the schema it knows, and an operator rolling out a new version must not have old nodes
//! writing into a schema they do not understand.

use postgres::Client;

use crate::store::{Result, StoreError};

struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

/// Every migration this binary knows, in order. A new one is added at the end, never changed once released.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../../../migrations/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "cluster",
        sql: include_str!("../../../migrations/0002_cluster.sql"),
    },
    Migration {
        version: 3,
        name: "incarnation",
        sql: include_str!("../../../migrations/0003_incarnation.sql"),
    },
    Migration {
        version: 4,
        name: "task_threads",
        sql: include_str!("../../../migrations/0004_task_threads.sql"),
    },
    Migration {
        version: 5,
        name: "task_files",
        sql: include_str!("../../../migrations/0005_task_files.sql"),
    },
    Migration {
        version: 6,
        name: "web_sessions",
        sql: include_str!("../../../migrations/0006_web_sessions.sql"),
    },
    Migration {
        version: 7,
        name: "pools",
        sql: include_str!("../../../migrations/0007_pools.sql"),
    },
    Migration {
        version: 8,
        name: "thread_chains",
        sql: include_str!("../../../migrations/0008_thread_chains.sql"),
    },
    Migration {
        version: 9,
        name: "admit_task",
        sql: include_str!("../../../migrations/0009_admit_task.sql"),
    },
    Migration {
        version: 10,
        name: "hot_task_rows",
        sql: include_str!("../../../migrations/0010_hot_task_rows.sql"),
    },
];

/// Key of the advisory lock held while migrating (the ASCII of "ctrelay" and a 1).
const LOCK_KEY: i64 = 0x6374_7265_6c61_7901;

/// The newest schema version this binary knows.
pub(super) fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Brings the database to [`latest`], or refuses it. Holds `client`'s session for the duration (the lock is
/// the session's: if this process dies meanwhile, the server releases it with the connection).
pub(super) fn migrate(client: &mut Client) -> Result<()> {
    client.batch_execute(&format!("SELECT pg_advisory_lock({LOCK_KEY})"))?;
    let applied = apply(client);
    let unlocked = client.batch_execute(&format!("SELECT pg_advisory_unlock({LOCK_KEY})"));
    applied?;
    unlocked?;
    Ok(())
}

fn apply(client: &mut Client) -> Result<()> {
    client.batch_execute(
        "CREATE TABLE IF NOT EXISTS ct_schema_migrations (
             version integer PRIMARY KEY,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )?;
    let applied: Vec<(i32, String)> = client
        .query(
            "SELECT version, name FROM ct_schema_migrations ORDER BY version",
            &[],
        )?
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect::<Result<_>>()?;
    for (version, name) in &applied {
        match MIGRATIONS.iter().find(|m| m.version == *version) {
            Some(m) if m.name == name => {}
            Some(m) => {
                return Err(StoreError::Schema(format!(
                    "the database records migration {version} as {name:?}, which this ct-relay knows as {:?}: \
                     it was not made by a ct-relay of this lineage",
                    m.name
                )))
            }
            None if *version > latest() => {
                return Err(StoreError::SchemaTooNew {
                    found: *version,
                    name: name.clone(),
                    known: latest(),
                })
            }
            None => {
                return Err(StoreError::Schema(format!(
                    "the database records migration {version} ({name:?}), which this ct-relay does not know"
                )))
            }
        }
    }
    for m in MIGRATIONS
        .iter()
        .filter(|m| !applied.iter().any(|(v, _)| *v == m.version))
    {
        let mut tx = client.transaction()?;
        tx.batch_execute(m.sql)?;
        tx.execute(
            "INSERT INTO ct_schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )?;
        tx.commit()?;
        tracing::info!(version = m.version, name = m.name, "database migrated");
    }
    Ok(())
}
