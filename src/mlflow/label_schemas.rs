//! MLflow's label schemas (`/api/3.0/mlflow/label-schemas/…`, open-source MLflow 3.17.2;
//! docs/mlflow-label-schemas.md says what was verified): get by name, create, update. Bodies are
//! JSON as the server speaks it (`{"label_schema": {…}}`); what a schema should contain is the
//! caller's business (`feedback::label_sync`).

use http::Method;
use serde_json::Value;

use super::{MlflowClient, MlflowError, MlflowErrorKind, Op, decode, validate};

const BASE: &str = "/api/3.0/mlflow/label-schemas";

impl MlflowClient {
    /// The schema named `name` in `experiment_id` (the `label_schema` object), or `None`.
    pub async fn get_label_schema(
        &self,
        experiment_id: &str,
        name: &str,
    ) -> Result<Option<Value>, MlflowError> {
        validate::experiment_id(experiment_id)?;
        let query: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("experiment_id", experiment_id)
            .append_pair("name", name)
            .finish();
        let path = format!("{BASE}/get-by-name?{query}");
        match self
            .call(Op::GetLabelSchema, Method::GET, &path, None)
            .await
        {
            Ok(bytes) => Ok(Some(envelope(&bytes)?)),
            Err(e) if e.kind == MlflowErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a schema: `body` is the request (`experiment_id`, `name`, `type`, `input`, …).
    pub async fn create_label_schema(&self, body: &Value) -> Result<Value, MlflowError> {
        let path = format!("{BASE}/create");
        let bytes = self
            .call(Op::CreateLabelSchema, Method::POST, &path, Some(body))
            .await?;
        envelope(&bytes)
    }

    /// Sparse update: `body` has `schema_id` and the fields to replace (`input`,
    /// `instruction`); the type and the input's kind cannot change.
    pub async fn update_label_schema(&self, body: &Value) -> Result<Value, MlflowError> {
        let path = format!("{BASE}/update");
        let bytes = self
            .call(Op::UpdateLabelSchema, Method::PATCH, &path, Some(body))
            .await?;
        envelope(&bytes)
    }
}

fn envelope(bytes: &[u8]) -> Result<Value, MlflowError> {
    let mut v: Value = decode(bytes)?;
    match v.get_mut("label_schema").map(Value::take) {
        Some(s @ Value::Object(_)) => Ok(s),
        _ => Err(MlflowError::new(
            MlflowErrorKind::Decode,
            "unexpected response from MLflow: no label_schema object",
        )),
    }
}
