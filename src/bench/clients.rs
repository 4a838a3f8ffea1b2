//! The benchmark's clients of each system under test, one type per system
//! and request kind. Every client hands back the response bytes without
//! building objects from them (the Redis client gets the JSON text, the
//! gRPC client the encoded message, PostgreSQL the JSON text), so each side
//! is measured for the same work: a request answered, on one machine.

use super::harness::Client;
use crate::proto;
use anyhow::{Context, bail};
use bytes::{Buf, Bytes};
use prost::Message;
use std::marker::PhantomData;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

/// Encodes a request with prost and hands the response back undecoded.
struct RawCodec<T>(PhantomData<T>);

struct RawEncoder<T>(PhantomData<T>);
struct RawDecoder;

impl<T: Message + Send + 'static> Codec for RawCodec<T> {
    type Encode = T;
    type Decode = Bytes;
    type Encoder = RawEncoder<T>;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder<T> {
        RawEncoder(PhantomData)
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl<T: Message> Encoder for RawEncoder<T> {
    type Item = T;
    type Error = tonic::Status;
    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        item.encode(buf)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

/// The HTTP/2 flow-control window of the benchmark's gRPC clients.
const WINDOW: u32 = 4 << 20;

/// Connects `n` HTTP/2 connections to the fabric (requests are spread
/// over them round-robin by the callers).
pub async fn fabric_channels(addr: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(
            Channel::from_shared(addr.to_string())?
                .tcp_nodelay(true)
                // A batch answer is ~150 KB: HTTP/2's default 64 KiB
                // window would cost it round trips for window updates.
                .initial_stream_window_size(WINDOW)
                .initial_connection_window_size(WINDOW * 4)
                .connect()
                .await
                .with_context(|| format!("cannot reach the fabric at {addr}"))?,
        );
    }
    Ok(out)
}

async fn unary<T: Message + Send + 'static>(
    grpc: &mut tonic::client::Grpc<Channel>,
    path: &'static str,
    req: T,
) -> anyhow::Result<Bytes> {
    grpc.ready().await?;
    let resp = grpc
        .unary(
            tonic::Request::new(req),
            PathAndQuery::from_static(path),
            RawCodec(PhantomData),
        )
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", path, s.message()))?;
    Ok(resp.into_inner())
}

/// `EntityService.GetEntity`.
pub struct FabricGet {
    pub grpc: tonic::client::Grpc<Channel>,
    pub entity_type: String,
}

#[async_trait::async_trait]
impl Client for FabricGet {
    async fn call(&mut self, id: u64) -> anyhow::Result<u64> {
        let req = proto::GetEntityRequest {
            r#type: self.entity_type.clone(),
            id: id.to_string(),
            view: String::new(),
            ..Default::default()
        };
        let body = unary(&mut self.grpc, "/fabric.v1.EntityService/GetEntity", req).await?;
        if body.is_empty() {
            bail!("GetEntity {id}: empty answer");
        }
        Ok(1)
    }
}

/// `EntityService.BatchGetEntities` of `size` consecutive ids from `id`.
pub struct FabricBatch {
    pub grpc: tonic::client::Grpc<Channel>,
    pub entity_type: String,
    pub size: u64,
    pub ids: u64,
}

/// How many times field 1 (the entities) occurs at the top of an encoded
/// `BatchGetEntitiesResponse`.
fn count_entities(mut b: Bytes) -> anyhow::Result<u64> {
    let mut n = 0;
    while b.has_remaining() {
        let key = prost::encoding::decode_varint(&mut b)?;
        let len = prost::encoding::decode_varint(&mut b)? as usize;
        if key & 7 != 2 || len > b.remaining() {
            bail!("unexpected field in a batch answer");
        }
        if key >> 3 == 1 {
            n += 1;
        }
        b.advance(len);
    }
    Ok(n)
}

pub fn batch_ids(id: u64, size: u64, ids: u64) -> impl Iterator<Item = u64> {
    (0..size).map(move |i| (id + i - 1) % ids + 1)
}

#[async_trait::async_trait]
impl Client for FabricBatch {
    async fn call(&mut self, id: u64) -> anyhow::Result<u64> {
        let req = proto::BatchGetEntitiesRequest {
            r#type: self.entity_type.clone(),
            ids: batch_ids(id, self.size, self.ids)
                .map(|i| i.to_string())
                .collect(),
            view: String::new(),
            ..Default::default()
        };
        let body = unary(
            &mut self.grpc,
            "/fabric.v1.EntityService/BatchGetEntities",
            req,
        )
        .await?;
        count_entities(body)
    }
}

/// Redis `GET customer:<id>` of the prebuilt JSON view.
pub struct RedisGet {
    pub conn: redis::aio::MultiplexedConnection,
}

pub fn redis_key(id: u64) -> String {
    format!("customer:{id}")
}

#[async_trait::async_trait]
impl Client for RedisGet {
    async fn call(&mut self, id: u64) -> anyhow::Result<u64> {
        let v: Option<Bytes> = redis::cmd("GET")
            .arg(redis_key(id))
            .query_async(&mut self.conn)
            .await?;
        match v {
            Some(_) => Ok(1),
            None => bail!("redis has no view of customer {id}"),
        }
    }
}

/// Redis `MGET` of `size` consecutive views.
pub struct RedisMget {
    pub conn: redis::aio::MultiplexedConnection,
    pub size: u64,
    pub ids: u64,
}

#[async_trait::async_trait]
impl Client for RedisMget {
    async fn call(&mut self, id: u64) -> anyhow::Result<u64> {
        let mut cmd = redis::cmd("MGET");
        for i in batch_ids(id, self.size, self.ids) {
            cmd.arg(redis_key(i));
        }
        let v: Vec<Option<Bytes>> = cmd.query_async(&mut self.conn).await?;
        Ok(v.iter().filter(|x| x.is_some()).count() as u64)
    }
}

/// The customer view as PostgreSQL builds it in one query: the customer row
/// plus `json_agg` of its orders and tickets by the indexed `customer_id`,
/// for the customers `$where` picks.
macro_rules! pg_view {
    ($where:literal) => {
        concat!(
            "SELECT json_build_object(",
            "'customer', row_to_json(c), ",
            "'orders', (SELECT json_agg(o ORDER BY o.id) FROM orders o WHERE o.customer_id = c.id), ",
            "'tickets', (SELECT json_agg(t ORDER BY t.id) FROM tickets t WHERE t.customer_id = c.id))::text ",
            "FROM customers c WHERE ",
            $where
        )
    };
}

/// One customer's view (prepared).
pub const PG_VIEW: &str = pg_view!("c.id = $1");

/// As [`PG_VIEW`], for many ids at once.
pub const PG_VIEWS: &str = pg_view!("c.id = ANY($1)");

pub struct PgGet {
    pub conn: sqlx::PgConnection,
}

#[async_trait::async_trait]
impl Client for PgGet {
    async fn call(&mut self, id: u64) -> anyhow::Result<u64> {
        let v: Option<(String,)> = sqlx::query_as(PG_VIEW)
            .bind(id as i64)
            .fetch_optional(&mut self.conn)
            .await?;
        match v {
            Some(_) => Ok(1),
            None => bail!("postgres has no customer {id}"),
        }
    }
}

pub struct PgBatch {
    pub conn: sqlx::PgConnection,
    pub size: u64,
    pub ids: u64,
}

#[async_trait::async_trait]
impl Client for PgBatch {
    async fn call(&mut self, id: u64) -> anyhow::Result<u64> {
        let ids: Vec<i64> = batch_ids(id, self.size, self.ids)
            .map(|i| i as i64)
            .collect();
        let rows: Vec<(String,)> = sqlx::query_as(PG_VIEWS)
            .bind(ids)
            .fetch_all(&mut self.conn)
            .await?;
        Ok(rows.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::wire::BatchWire;

    #[test]
    fn entities_of_a_batch_answer_are_counted() {
        let batch = BatchWire {
            entities: vec![Bytes::from_static(b"\x0a\x01x"), Bytes::from_static(b"")],
            missing_ids: vec!["9".into()],
        };
        assert_eq!(count_entities(batch.encode_to_vec().into()).unwrap(), 2);
    }

    #[test]
    fn batch_ids_wrap_around() {
        assert_eq!(batch_ids(9, 3, 10).collect::<Vec<_>>(), vec![9, 10, 1]);
    }
}
