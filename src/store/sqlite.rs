//! SQLite backend. PLACEHOLDER: being implemented in the store change; every call fails.

use std::path::Path;

use super::*;

pub struct SqliteStore;

/// Opens (and migrates) the database file.
pub async fn open(_path: &Path, _config: &StoreConfig) -> Result<SharedStore, StoreError> {
    Ok(Arc::new(SqliteStore))
}

fn nope<T>() -> Result<T, StoreError> {
    Err(StoreError::Unavailable(
        "the SQLite store is not implemented in this build".into(),
    ))
}

#[async_trait]
impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }
    async fn health(&self) -> Result<(), StoreError> {
        nope()
    }
    async fn claim_message(&self, _: &LinkRecord) -> Result<Claim, StoreError> {
        nope()
    }
    async fn record_links(&self, _: &[LinkRecord]) -> Result<(), StoreError> {
        nope()
    }
    async fn get_link(&self, _: &str) -> Result<Option<MessageLink>, StoreError> {
        nope()
    }
    async fn set_link_trace_id(&self, _: &str, _: &str) -> Result<(), StoreError> {
        nope()
    }
    async fn upsert_vote(&self, _: &NewVote, _: &Enqueue) -> Result<Delivery, StoreError> {
        nope()
    }
    async fn retract_vote(&self, _: &VoteKey) -> Result<Option<Delivery>, StoreError> {
        nope()
    }
    async fn list_votes(&self, _: &str, _: &str) -> Result<Vec<Vote>, StoreError> {
        nope()
    }
    async fn claim_due(&self, _: u32, _: Duration) -> Result<Vec<Delivery>, StoreError> {
        nope()
    }
    async fn claim(
        &self,
        _: &VoteKey,
        _: i64,
        _: Duration,
    ) -> Result<Option<Delivery>, StoreError> {
        nope()
    }
    async fn finish(
        &self,
        _: &VoteKey,
        _: i64,
        _: &AssessmentFact,
        _: &Outcome,
    ) -> Result<bool, StoreError> {
        nope()
    }
    async fn list_deliveries(
        &self,
        _: Option<DeliveryState>,
        _: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        nope()
    }
    async fn requeue(&self, _: DeliveryState, _: Option<&VoteKey>) -> Result<u64, StoreError> {
        nope()
    }
    async fn delivery_stats(&self) -> Result<DeliveryStats, StoreError> {
        nope()
    }
    fn pool_status(&self) -> PoolStatus {
        PoolStatus::default()
    }
}
