//! Evaluation datasets, review queues and whole traces: the calls `feedback-proxy dataset sync`
//! and the review queue delivery make (`/api/3.0/mlflow/datasets/...`,
//! `/api/3.0/mlflow/review-queues/...`, `/api/3.0/mlflow/traces/get`). Shapes as open-source
//! MLflow 3.17.2 speaks them (docs/deploy.md, "Evaluation datasets and review queues", says
//! what was verified): record lists and tags travel as JSON *strings* inside the JSON body,
//! because the protos declare them as `string`.
//!
//! What it does not do: decide which traces go where (the `review::dataset` module), page
//! through everything (callers page), or retry.

use std::collections::BTreeMap;

use http::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{MlflowClient, MlflowError, MlflowErrorKind, Op, decode, seg, validate};

/// A dataset's identity as search / create return it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetInfo {
    pub dataset_id: String,
    pub name: String,
}

/// One record of an evaluation dataset, as read back (only what the sync compares).
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetRecord {
    pub dataset_record_id: String,
    pub inputs: Value,
    pub expectations: BTreeMap<String, Value>,
    pub tags: BTreeMap<String, String>,
    /// `source.source_data.trace_id` of a record made from a trace.
    pub source_trace_id: Option<String>,
}

/// A record to upsert. MLflow keys records by a hash of `inputs` (per dataset): upserting the
/// same inputs again merges `expectations` and `tags` into the existing record (keys are added
/// or replaced, never removed) instead of adding one.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRecord {
    pub inputs: Value,
    pub expectations: BTreeMap<String, Value>,
    pub tags: BTreeMap<String, String>,
    /// Recorded as the record's source (`{"source_type": "TRACE", "source_data": {"trace_id"}}`).
    pub trace_id: String,
}

/// What an upsert did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Upserted {
    pub inserted: u64,
    pub updated: u64,
}

/// One page of records and the token of the next (`None`: last page).
pub type RecordPage = (Vec<DatasetRecord>, Option<String>);

#[derive(Deserialize)]
struct WireDataset {
    dataset_id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    created_time: Option<i64>,
}

#[derive(Deserialize)]
struct DatasetEnvelope {
    dataset: WireDataset,
}

#[derive(Deserialize)]
struct SearchDatasets {
    #[serde(default)]
    datasets: Vec<WireDataset>,
}

#[derive(Deserialize)]
struct RecordsAnswer {
    /// A JSON array, as a string; absent when the dataset is empty.
    #[serde(default)]
    records: Option<String>,
    #[serde(default)]
    next_page_token: Option<String>,
}

#[derive(Deserialize)]
struct WireRecord {
    dataset_record_id: String,
    #[serde(default)]
    inputs: Value,
    #[serde(default)]
    expectations: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    tags: Option<BTreeMap<String, String>>,
    #[serde(default)]
    source: Option<WireRecordSource>,
}

#[derive(Deserialize)]
struct WireRecordSource {
    #[serde(default)]
    source_data: Option<BTreeMap<String, Value>>,
}

#[derive(Deserialize)]
struct UpsertAnswer {
    #[serde(default)]
    inserted_count: u64,
    #[serde(default)]
    updated_count: u64,
}

#[derive(Deserialize)]
struct QueueEnvelope {
    review_queue: WireQueue,
}

#[derive(Deserialize)]
struct WireQueue {
    queue_id: String,
}

#[derive(Deserialize)]
struct ItemsAnswer {
    #[serde(default)]
    items: Vec<WireItem>,
    #[serde(default)]
    next_page_token: Option<String>,
}

#[derive(Deserialize)]
struct WireItem {
    item_id: String,
}

#[derive(Deserialize)]
struct FullTrace {
    trace: FullTraceBody,
}

#[derive(Deserialize)]
struct FullTraceBody {
    #[serde(default)]
    spans: Vec<WireSpan>,
}

/// An OpenTelemetry span as the server's JSON shows it (only what finding the request needs).
#[derive(Deserialize)]
struct WireSpan {
    #[serde(default)]
    parent_span_id: Option<String>,
    #[serde(default)]
    attributes: Vec<WireAttribute>,
}

#[derive(Deserialize)]
struct WireAttribute {
    key: String,
    /// An OTel `AnyValue` in proto JSON (`{"kvlist_value": …}`, `{"string_value": …}`, …);
    /// absent for a null.
    #[serde(default)]
    value: Option<Value>,
}

/// An OTel `AnyValue` (proto JSON) as plain JSON, as MLflow's `_decode_otel_proto_anyvalue`
/// reads it: key/value lists become objects, arrays arrays, an unset value null; int64s come
/// as decimal strings in proto JSON and are turned back into numbers. A string holding JSON
/// (how some exporters store span inputs) is parsed.
fn any_value(v: &Value) -> Value {
    let Some(obj) = v.as_object() else {
        return Value::Null;
    };
    if let Some(list) = obj.get("kvlist_value") {
        let mut out = serde_json::Map::new();
        for kv in list["values"].as_array().into_iter().flatten() {
            if let Some(k) = kv["key"].as_str() {
                out.insert(k.to_owned(), kv.get("value").map_or(Value::Null, any_value));
            }
        }
        return Value::Object(out);
    }
    if let Some(arr) = obj.get("array_value") {
        let items = arr["values"].as_array().into_iter().flatten();
        return Value::Array(items.map(any_value).collect());
    }
    if let Some(i) = obj.get("int_value") {
        return match i {
            Value::String(s) => s.parse::<i64>().map_or_else(|_| i.clone(), Value::from),
            other => other.clone(),
        };
    }
    for k in ["bool_value", "double_value", "bytes_value"] {
        if let Some(x) = obj.get(k) {
            return x.clone();
        }
    }
    match obj.get("string_value") {
        Some(Value::String(s)) => {
            serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone()))
        }
        _ => Value::Null,
    }
}

/// The root span's attribute that holds its inputs.
const SPAN_INPUTS: &str = "mlflow.spanInputs";

fn decode_err(what: &str) -> MlflowError {
    MlflowError::new(
        MlflowErrorKind::Decode,
        format!("unexpected response from MLflow: {what}"),
    )
}

impl MlflowClient {
    /// The dataset called `name` among `experiment_id`'s datasets, if there is one.
    pub async fn find_dataset(
        &self,
        experiment_id: &str,
        name: &str,
    ) -> Result<Option<DatasetInfo>, MlflowError> {
        validate::experiment_id(experiment_id)?;
        let literal = validate::dataset_name_literal(name)?;
        let body = json!({
            "experiment_ids": [experiment_id],
            "filter_string": format!("name = {literal}"),
            "max_results": 1000,
        });
        let bytes = self
            .call(
                Op::SearchDatasets,
                Method::POST,
                "/api/3.0/mlflow/datasets/search",
                Some(&body),
            )
            .await?;
        Ok(decode::<SearchDatasets>(&bytes)?
            .datasets
            .into_iter()
            // The filter is the server's; the exact name is ours to check. Names are not
            // unique (a second create with the same name makes a second dataset): the oldest
            // one is the dataset, so that every run picks the same.
            .filter(|d| d.name == name)
            .min_by_key(|d| (d.created_time.unwrap_or(i64::MAX), d.dataset_id.clone()))
            .map(|d| DatasetInfo {
                dataset_id: d.dataset_id,
                name: d.name,
            }))
    }

    /// Creates an evaluation dataset linked to `experiment_id`.
    pub async fn create_dataset(
        &self,
        experiment_id: &str,
        name: &str,
    ) -> Result<DatasetInfo, MlflowError> {
        validate::experiment_id(experiment_id)?;
        validate::dataset_name_literal(name)?;
        let body = json!({"name": name, "experiment_ids": [experiment_id]});
        let bytes = self
            .call(
                Op::CreateDataset,
                Method::POST,
                "/api/3.0/mlflow/datasets/create",
                Some(&body),
            )
            .await?;
        let d = decode::<DatasetEnvelope>(&bytes)?.dataset;
        Ok(DatasetInfo {
            dataset_id: d.dataset_id,
            name: d.name,
        })
    }

    /// One page of a dataset's records.
    pub async fn dataset_records(
        &self,
        dataset_id: &str,
        page_token: Option<&str>,
    ) -> Result<RecordPage, MlflowError> {
        validate::path_id("dataset id", dataset_id)?;
        let mut path = format!(
            "/api/3.0/mlflow/datasets/{}/records?max_results=1000",
            seg(dataset_id)
        );
        if let Some(t) = page_token {
            path.push_str("&page_token=");
            path.push_str(&seg(t));
        }
        let bytes = self
            .call(Op::GetDatasetRecords, Method::GET, &path, None)
            .await?;
        let answer = decode::<RecordsAnswer>(&bytes)?;
        let records: Vec<WireRecord> = match answer.records.as_deref() {
            None | Some("") => Vec::new(),
            Some(s) => serde_json::from_str(s).map_err(|e| decode_err(&format!("records: {e}")))?,
        };
        let records = records
            .into_iter()
            .map(|r| DatasetRecord {
                dataset_record_id: r.dataset_record_id,
                inputs: r.inputs,
                expectations: r.expectations.unwrap_or_default(),
                tags: r.tags.unwrap_or_default(),
                source_trace_id: r
                    .source
                    .and_then(|s| s.source_data)
                    .and_then(|d| d.get("trace_id").and_then(Value::as_str).map(str::to_owned)),
            })
            .collect();
        Ok((records, answer.next_page_token.filter(|t| !t.is_empty())))
    }

    /// Inserts or merges `records` (see [`NewRecord`] for how MLflow keys them).
    pub async fn upsert_dataset_records(
        &self,
        dataset_id: &str,
        records: &[NewRecord],
    ) -> Result<Upserted, MlflowError> {
        validate::path_id("dataset id", dataset_id)?;
        let list: Vec<Value> = records
            .iter()
            .map(|r| {
                let mut v = json!({
                    "inputs": r.inputs,
                    "tags": r.tags,
                    "source": {"source_type": "TRACE", "source_data": {"trace_id": r.trace_id}},
                });
                if !r.expectations.is_empty() {
                    v["expectations"] = json!(r.expectations);
                }
                v
            })
            .collect();
        // The proto's `records` is a string holding the JSON list.
        let body = json!({"records": Value::Array(list).to_string()});
        let path = format!("/api/3.0/mlflow/datasets/{}/records", seg(dataset_id));
        let bytes = self
            .call(Op::UpsertDatasetRecords, Method::POST, &path, Some(&body))
            .await?;
        let a = decode::<UpsertAnswer>(&bytes)?;
        Ok(Upserted {
            inserted: a.inserted_count,
            updated: a.updated_count,
        })
    }

    /// The request of a trace: its root span's inputs (what MLflow's own
    /// `EvaluationDataset.merge_records(traces)` takes as a record's inputs). `None` when the
    /// trace has no root span with inputs.
    pub async fn trace_request(&self, trace_id: &str) -> Result<Option<Value>, MlflowError> {
        validate::path_id("trace id", trace_id)?;
        let path = format!("/api/3.0/mlflow/traces/get?trace_id={}", seg(trace_id));
        let bytes = self.call(Op::GetTrace, Method::GET, &path, None).await?;
        let trace = decode::<FullTrace>(&bytes)?.trace;
        let root = trace
            .spans
            .iter()
            .find(|s| s.parent_span_id.as_deref().is_none_or(str::is_empty));
        Ok(root
            .and_then(|s| s.attributes.iter().find(|a| a.key == SPAN_INPUTS))
            .map(|a| a.value.as_ref().map_or(Value::Null, any_value)))
    }

    /// The review queue called `name` in `experiment_id`, created (CUSTOM, no assigned users)
    /// if missing; returns its id.
    pub async fn ensure_review_queue(
        &self,
        experiment_id: &str,
        name: &str,
    ) -> Result<String, MlflowError> {
        validate::experiment_id(experiment_id)?;
        validate::dataset_name_literal(name)?;
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("experiment_id", experiment_id)
            .append_pair("name", name)
            .finish();
        let path = format!("/api/3.0/mlflow/review-queues/get-by-name?{query}");
        let found = |bytes: bytes::Bytes| -> Result<String, MlflowError> {
            Ok(decode::<QueueEnvelope>(&bytes)?.review_queue.queue_id)
        };
        match self
            .call(Op::GetReviewQueue, Method::GET, &path, None)
            .await
        {
            Ok(bytes) => return found(bytes),
            Err(e) if e.kind == MlflowErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let body = json!({"experiment_id": experiment_id, "name": name, "queue_type": "CUSTOM"});
        match self
            .call(
                Op::CreateReviewQueue,
                Method::POST,
                "/api/3.0/mlflow/review-queues/create",
                Some(&body),
            )
            .await
        {
            Ok(bytes) => found(bytes),
            // Names are unique per experiment (case-insensitively): another process made it
            // between our look and our create.
            Err(e) if e.kind == MlflowErrorKind::AlreadyExists => found(
                self.call(Op::GetReviewQueue, Method::GET, &path, None)
                    .await?,
            ),
            Err(e) => Err(e),
        }
    }

    /// Attaches traces to a review queue. Idempotent on the server: a trace already in the
    /// queue stays one item.
    pub async fn add_to_review_queue(
        &self,
        queue_id: &str,
        trace_ids: &[&str],
    ) -> Result<(), MlflowError> {
        validate::path_id("review queue id", queue_id)?;
        for t in trace_ids {
            validate::path_id("trace id", t)?;
        }
        let body = json!({"queue_id": queue_id, "item_type": "TRACE", "item_ids": trace_ids});
        self.call(
            Op::AddReviewQueueItems,
            Method::POST,
            "/api/3.0/mlflow/review-queues/items/add",
            Some(&body),
        )
        .await
        .map(drop)
    }

    /// One page of the trace ids in a review queue.
    pub async fn review_queue_items(
        &self,
        queue_id: &str,
        page_token: Option<&str>,
    ) -> Result<(Vec<String>, Option<String>), MlflowError> {
        validate::path_id("review queue id", queue_id)?;
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("queue_id", queue_id);
        if let Some(t) = page_token {
            q.append_pair("page_token", t);
        }
        let path = format!("/api/3.0/mlflow/review-queues/items/list?{}", q.finish());
        let bytes = self
            .call(Op::ListReviewQueueItems, Method::GET, &path, None)
            .await?;
        let a = decode::<ItemsAnswer>(&bytes)?;
        Ok((
            a.items.into_iter().map(|i| i.item_id).collect(),
            a.next_page_token.filter(|t| !t.is_empty()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The root span's inputs of a trace logged by `@mlflow.trace` on 3.17.2, as
    /// `GET /api/3.0/mlflow/traces/get` answered.
    #[test]
    fn otel_any_values_decode_as_mlflow_decodes_them() {
        let v = json!({"kvlist_value": {"values": [
            {"key": "input", "value": {"array_value": {"values": [{"kvlist_value": {"values": [
                {"key": "role", "value": {"string_value": "user"}},
                {"key": "content", "value": {"string_value": "what is 6*7"}}]}}]}}},
            {"key": "custom_inputs"},
            {"key": "n", "value": {"int_value": "7"}},
            {"key": "j", "value": {"string_value": "{\"a\": 1}"}}]}});
        assert_eq!(
            any_value(&v),
            json!({"input": [{"role": "user", "content": "what is 6*7"}],
                   "custom_inputs": null, "n": 7, "j": {"a": 1}})
        );
    }
}
