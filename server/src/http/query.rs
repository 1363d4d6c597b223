//! `GET|POST /api/v1/query` and `/api/v3/query_sql` (InfluxDB 3's path, which
//! names the SQL `q`): SQL in, rows out in the asked-for format, streamed as the
//! query makes them.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use citytsdb_query::QueryStream;
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use serde::Deserialize;

use super::error::ApiError;
use super::AppState;

/// Largest `POST /api/v1/query` body (a statement and its parameters).
const MAX_QUERY_BODY: usize = 4 << 20;
use crate::auth::Caller;
use crate::format::{Encoder, Format};
use axum::{Extension, Json};
use serde_json::json;

/// The parameters of a query, from the URL or a JSON body.
#[derive(Debug, Default, Deserialize)]
pub struct QueryParams {
    /// Database.
    pub db: Option<String>,
    /// The SQL.
    pub sql: Option<String>,
    /// `q`, the InfluxDB spelling of `sql`.
    pub q: Option<String>,
    /// Output format; `json` by default.
    pub format: Option<String>,
}

/// `GET /api/v1/query?db=&sql=&format=`.
pub async fn query_get(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Query(p): Query<QueryParams>,
) -> Result<Response, ApiError> {
    run(&app, &caller, p, false).await
}

/// `POST /api/v1/query` with `{"db", "sql", "format"}`.
pub async fn query_post(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let body = super::write::read_body(&headers, body, MAX_QUERY_BODY).await?;
    let p: QueryParams = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "body is not a JSON object with db, sql and format: {e} (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    run(&app, &caller, p, true).await
}

async fn run(
    app: &AppState,
    caller: &Caller,
    p: QueryParams,
    post: bool,
) -> Result<Response, ApiError> {
    let db =
        p.db.filter(|d| !d.is_empty())
            .ok_or_else(|| ApiError::bad_request("missing parameter db"))?;
    let sql = p
        .sql
        .or(p.q)
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| ApiError::bad_request("missing parameter sql"))?;
    if let Some(delete) = citytsdb_query::delete::parse_delete(&sql)? {
        super::require(caller, caller.can_write(&db), &format!("write:{db}"))?;
        if !post {
            return Err(ApiError::bad_request(
                "DELETE changes data: send it with POST /api/v1/query",
            ));
        }
        // Its own task: a client that goes away does not cut a delete short between
        // its commit and the registry correction that follows it.
        let query = app.query.clone();
        let deleted = tokio::spawn(async move { query.delete(&db, &delete).await })
            .await
            .map_err(ApiError::task)??;
        return Ok(Json(json!({ "deleted": deleted })).into_response());
    }
    super::require(caller, caller.can_read(&db), &format!("read:{db}"))?;
    let format = match p.format.as_deref() {
        None | Some("") => Format::Json,
        Some(f) => Format::parse(f).ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown format '{f}': use json, jsonl, csv, pretty, arrow or parquet"
            ))
        })?,
    };
    let mut stream = app.query.stream(&db, &sql).await?;
    // The first batch decides the status: an error before any row is a clean 4xx.
    let first = match stream.next().await {
        Some(Err(e)) => return Err(e.into()),
        Some(Ok(batch)) => Some(batch),
        None => None,
    };
    let (encoder, head) = Encoder::new(format, &stream.schema).map_err(render_error)?;
    let body = Body {
        head: Some(head),
        first,
        stream,
        encoder: Some(encoder),
        ready: VecDeque::new(),
    };
    let chunks = futures::stream::unfold(Some(body), |body| async move {
        let mut body = body?;
        let (chunk, more) = body.next_chunk().await;
        Some((chunk, more.then_some(body)))
    });
    Ok((
        [(CONTENT_TYPE, format.content_type())],
        axum::body::Body::from_stream(chunks),
    )
        .into_response())
}

fn render_error(e: ArrowError) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("rendering the answer: {e}"),
    )
}

/// An answer on its way out: encoded batch by batch as the client reads.
struct Body {
    head: Option<Vec<u8>>,
    first: Option<RecordBatch>,
    stream: QueryStream,
    encoder: Option<Encoder>,
    /// Printed pieces of the last batch not yet handed out.
    ready: VecDeque<Bytes>,
}

impl Body {
    /// The next bytes, and whether more follow. A failure after the status went
    /// out can only cut the answer short: the connection is closed mid-body, so
    /// no client mistakes a partial answer for a whole one.
    async fn next_chunk(&mut self) -> (Result<Bytes, std::io::Error>, bool) {
        if let Some(head) = self.head.take() {
            return (Ok(head.into()), true);
        }
        if let Some(piece) = self.ready.pop_front() {
            return (Ok(piece), true);
        }
        let item = match self.first.take() {
            Some(batch) => Some(Ok(batch)),
            None => self.stream.next().await,
        };
        let Some(encoder) = self.encoder.as_mut() else {
            return (Ok(Bytes::new()), false);
        };
        match item {
            Some(Ok(batch)) => match print(encoder, batch).await {
                Ok(pieces) => {
                    self.ready = pieces;
                    let first = self.ready.pop_front().unwrap_or_default();
                    (Ok(first), true)
                }
                Err(e) => (Err(cut_short(e.to_string())), false),
            },
            Some(Err(e)) => (Err(cut_short(e.to_string())), false),
            None => match self.encoder.take().map(Encoder::finish) {
                Some(Ok(bytes)) => (Ok(bytes.into()), false),
                Some(Err(e)) => (Err(cut_short(e.to_string())), false),
                None => (Ok(Bytes::new()), false),
            },
        }
    }
}

/// Rows of a piece of a batch printed on a thread of its own.
const PIECE_ROWS: usize = 1024;

/// `batch` printed in order, in pieces. Printing text costs 100-200 ns a row
/// (each value formatted, JSON keys repeated), more than the query itself for a
/// few thousand latest readings: a batch of at least two pieces' rows is split
/// into up to one piece per CPU, and all but the first are printed on the
/// blocking pool while this task prints the first.
async fn print(encoder: &mut Encoder, batch: RecordBatch) -> Result<VecDeque<Bytes>, ArrowError> {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cpus = *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let rows = batch.num_rows();
    let pieces = (rows / PIECE_ROWS).min(cpus);
    if pieces < 2 || !encoder.prints_by_row() {
        return Ok(VecDeque::from([Bytes::from(encoder.batch(&batch)?)]));
    }
    let per = rows.div_ceil(pieces);
    let mut later = Vec::with_capacity(pieces - 1);
    for start in (per..rows).step_by(per) {
        let piece = batch.slice(start, per.min(rows - start));
        let Some(mut ahead) = encoder.ahead(start) else {
            break;
        };
        later.push(tokio::task::spawn_blocking(move || ahead.batch(&piece)));
    }
    let mut out = VecDeque::with_capacity(pieces);
    out.push_back(Bytes::from(encoder.batch(&batch.slice(0, per))?));
    for piece in later {
        let bytes = piece
            .await
            .map_err(|e| ArrowError::ExternalError(Box::new(e)))??;
        out.push_back(Bytes::from(bytes));
    }
    encoder.skip(rows - per);
    Ok(out)
}

fn cut_short(why: String) -> std::io::Error {
    tracing::warn!(error = %why, "a query failed while its answer was streaming; the answer was cut short");
    std::io::Error::other(why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Float64Array, Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    fn batch(rows: usize, from: usize) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, true),
            Field::new("v", DataType::Float64, true),
            Field::new("n", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from_iter(
                    (from..from + rows).map(|i| (i % 7 != 0).then(|| format!("d\"{i}"))),
                )),
                Arc::new(Float64Array::from_iter_values(
                    (from..from + rows).map(|i| i as f64 / 8.0),
                )),
                Arc::new(Int64Array::from_iter_values(
                    (from..from + rows).map(|i| i as i64),
                )),
            ],
        )
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_printed_in_pieces_reads_as_printed_whole() {
        // Batches too small to split and large enough, in an odd number of rows,
        // one after another: the JSON array's commas continue across pieces.
        let batches = [
            batch(10, 0),
            batch(5 * PIECE_ROWS + 3, 10),
            batch(2 * PIECE_ROWS, 9000),
        ];
        for format in [Format::Json, Format::JsonLines, Format::Csv, Format::Arrow] {
            let schema = batches[0].schema();
            let whole = crate::format::render(format, &schema, &batches).unwrap();
            let (mut encoder, mut printed) = Encoder::new(format, &schema).unwrap();
            let mut most = 0;
            for b in &batches {
                let pieces = print(&mut encoder, b.clone()).await.unwrap();
                most = most.max(pieces.len());
                for p in pieces {
                    printed.extend_from_slice(&p);
                }
            }
            printed.extend(encoder.finish().unwrap());
            assert_eq!(printed, whole, "{format:?}");
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let expected = match format {
                Format::Arrow => 1,
                _ => cpus.min(5),
            };
            assert_eq!(most, expected, "{format:?}");
        }
    }
}
