//! Pre-encoded responses: the server sends the cached encoding of an entity
//! version (see `Entity::encoded`) as it is, instead of building and
//! encoding a message on every read. On the wire these are exactly
//! `fabric.v1.Entity` and `fabric.v1.BatchGetEntitiesResponse`.

use bytes::{Buf, BufMut, Bytes};
use prost::DecodeError;
use prost::encoding::{
    DecodeContext, WireType, encode_key, encode_varint, encoded_len_varint, key_len,
};

/// An encoded `fabric.v1.Entity`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EntityWire(pub Bytes);

impl prost::Message for EntityWire {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        // The server only sends these; a decode keeps nothing.
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Bytes::new();
    }
}

/// An encoded `fabric.v1.BatchGetEntitiesResponse`: field 1 the entities,
/// field 2 the missing ids.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchWire {
    pub entities: Vec<Bytes>,
    pub missing_ids: Vec<String>,
}

impl prost::Message for BatchWire {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for e in &self.entities {
            encode_key(1, WireType::LengthDelimited, buf);
            encode_varint(e.len() as u64, buf);
            buf.put_slice(e);
        }
        prost::encoding::string::encode_repeated(2, &self.missing_ids, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.entities
            .iter()
            .map(|e| key_len(1) + encoded_len_varint(e.len() as u64) + e.len())
            .sum::<usize>()
            + prost::encoding::string::encoded_len_repeated(2, &self.missing_ids)
    }

    fn clear(&mut self) {
        self.entities.clear();
        self.missing_ids.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;
    use prost::Message;

    fn entity(id: &str) -> proto::Entity {
        proto::Entity {
            r#type: "customer".into(),
            id: id.into(),
            version: 7,
            ..Default::default()
        }
    }

    #[test]
    fn wire_types_encode_the_real_messages() {
        let e = entity("1");
        let wire = EntityWire(e.encode_to_vec().into());
        assert_eq!(proto::Entity::decode(&*wire.encode_to_vec()).unwrap(), e);

        let batch = BatchWire {
            entities: vec![e.encode_to_vec().into(), entity("2").encode_to_vec().into()],
            missing_ids: vec!["9".into()],
        };
        let bytes = batch.encode_to_vec();
        assert_eq!(bytes.len(), batch.encoded_len());
        let back = proto::BatchGetEntitiesResponse::decode(&*bytes).unwrap();
        assert_eq!(back.entities, vec![e, entity("2")]);
        assert_eq!(back.missing_ids, vec!["9".to_string()]);
    }
}
