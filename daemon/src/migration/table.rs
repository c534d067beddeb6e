//! Every migration record, in memory and on disk. An engine reports
//! through the [`MigrationHandle`] of its migration; every update is
//! persisted before it is visible.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::info;

use crate::model::MigrationRecord;
use crate::store::{SaveRecordError, Store};

/// A migration record update that could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum UpdateMigrationError {
    #[error("migration {name} does not exist")]
    NotFound { name: String },
    #[error("cannot persist migration {name}")]
    Persist {
        name: String,
        #[source]
        source: SaveRecordError,
    },
}

/// All migration records, in memory and on disk.
#[derive(Debug)]
pub struct MigrationTable {
    store: Store,
    records: Mutex<BTreeMap<String, MigrationRecord>>,
}

impl MigrationTable {
    pub fn new(store: Store, records: Vec<MigrationRecord>) -> Self {
        let records = records.into_iter().map(|r| (r.name.clone(), r)).collect();
        Self {
            store,
            records: Mutex::new(records),
        }
    }

    /// The map; a panic while it was held does not poison it for good,
    /// because every write is a whole-record replace.
    pub(crate) fn lock(&self) -> MutexGuard<'_, BTreeMap<String, MigrationRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn get(&self, name: &str) -> Option<MigrationRecord> {
        self.lock().get(name).cloned()
    }

    /// Oldest first.
    pub fn list(&self) -> Vec<MigrationRecord> {
        let mut v: Vec<_> = self.lock().values().cloned().collect();
        v.sort_by_key(|r| r.creation_timestamp);
        v
    }

    /// The pending or running migration of `vm`, if any.
    pub fn active_for(&self, vm: &str) -> Option<MigrationRecord> {
        self.lock()
            .values()
            .find(|r| r.vm == vm && !r.phase.is_final())
            .cloned()
    }

    pub fn handle(self: &Arc<Self>, name: &str) -> MigrationHandle {
        MigrationHandle {
            name: name.into(),
            table: self.clone(),
        }
    }
}

/// One migration's record, for the engine driving it.
#[derive(Clone, Debug)]
pub struct MigrationHandle {
    name: String,
    table: Arc<MigrationTable>,
}

impl MigrationHandle {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn get(&self) -> Option<MigrationRecord> {
        self.table.get(&self.name)
    }

    /// Applies `f` to the record and persists it. The in-memory record only
    /// changes if the write succeeded, so the API never shows a state that a
    /// restart would lose.
    pub fn update(
        &self,
        f: impl FnOnce(&mut MigrationRecord),
    ) -> Result<MigrationRecord, UpdateMigrationError> {
        let mut map = self.table.lock();
        let current = map
            .get(&self.name)
            .ok_or_else(|| UpdateMigrationError::NotFound {
                name: self.name.clone(),
            })?;
        let mut next = current.clone();
        f(&mut next);
        self.table
            .store
            .save_migration(&next)
            .map_err(|source| UpdateMigrationError::Persist {
                name: self.name.clone(),
                source,
            })?;
        if next.phase != current.phase {
            info!(migration = %self.name, from = %current.phase, to = %next.phase, "migration phase");
        }
        map.insert(self.name.clone(), next.clone());
        Ok(next)
    }
}
