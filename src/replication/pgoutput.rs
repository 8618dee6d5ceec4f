//! Decoder for the pgoutput (protocol version 1) messages that the replication transport hands
//! over as raw bytes: Relation, Type, Insert, Update, Delete, Truncate and Origin.

use bytes::Bytes;

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value that the message leaves out; keep the stored one.
    Unchanged,
    /// The value in text output format.
    Text(Bytes),
    /// The value in binary send format.
    Binary(Bytes),
}

/// A column as a Relation message describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity key.
    pub key: bool,
    /// Column name.
    pub name: String,
    /// Type oid.
    pub type_oid: u32,
    /// Type modifier.
    pub type_mod: i32,
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The shape of a relation; precedes its first change in a session and follows changes to it.
    Relation {
        /// Relation oid.
        oid: u32,
        /// Schema.
        namespace: String,
        /// Table name.
        name: String,
        /// Replica identity setting.
        replica_identity: u8,
        /// Columns in order.
        columns: Vec<RelationColumn>,
    },
    /// A custom type's name.
    Type {
        /// Type oid.
        oid: u32,
        /// Schema.
        namespace: String,
        /// Type name.
        name: String,
    },
    /// A new row.
    Insert {
        /// Relation oid.
        oid: u32,
        /// The row.
        new: Vec<TupleValue>,
    },
    /// A changed row; `old` is the key (or full old row) when the key changed or identity is full.
    Update {
        /// Relation oid.
        oid: u32,
        /// Old key or row.
        old: Option<Vec<TupleValue>>,
        /// The new row.
        new: Vec<TupleValue>,
    },
    /// A removed row, by key (or full old row).
    Delete {
        /// Relation oid.
        oid: u32,
        /// Old key or row.
        old: Vec<TupleValue>,
    },
    /// Truncated relations.
    Truncate {
        /// Relation oids.
        oids: Vec<u32>,
    },
    /// Origin of a transaction (ignored).
    Origin,
}

/// A malformed message.
#[derive(Debug, thiserror::Error)]
#[error("malformed pgoutput message: {0}")]
pub struct DecodeError(&'static str);

struct Reader {
    b: Bytes,
    i: usize,
}

impl Reader {
    fn u8(&mut self) -> Result<u8, DecodeError> {
        let v = *self.b.get(self.i).ok_or(DecodeError("truncated"))?;
        self.i += 1;
        Ok(v)
    }
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self
            .i
            .checked_add(n)
            .ok_or(DecodeError("length overflow"))?;
        let s = self.b.get(self.i..end).ok_or(DecodeError("truncated"))?;
        self.i = end;
        Ok(s)
    }
    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let rest = self.b.get(self.i..).ok_or(DecodeError("truncated"))?;
        let n = rest
            .iter()
            .position(|&c| c == 0)
            .ok_or(DecodeError("unterminated string"))?;
        let s = String::from_utf8(rest[..n].to_vec()).map_err(|_| DecodeError("invalid utf-8"))?;
        self.i += n + 1;
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<TupleValue>, DecodeError> {
        let n = self.i16()?;
        let mut out = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::Unchanged,
                kind @ (b't' | b'b') => {
                    let len = self.i32()?;
                    if len < 0 {
                        return Err(DecodeError("negative length"));
                    }
                    let start = self.i;
                    self.take(len as usize)?;
                    let v = self.b.slice(start..self.i);
                    if kind == b't' {
                        TupleValue::Text(v)
                    } else {
                        TupleValue::Binary(v)
                    }
                }
                _ => return Err(DecodeError("unknown tuple value kind")),
            });
        }
        Ok(out)
    }
}

/// Decodes one message. Returns `Ok(None)` for message kinds that the transport decodes itself
/// (Begin, Commit, logical Message) or that carry nothing we use.
pub fn decode(data: Bytes) -> Result<Option<Message>, DecodeError> {
    let mut r = Reader { b: data, i: 0 };
    let tag = r.u8()?;
    Ok(Some(match tag {
        b'R' => {
            let oid = r.u32()?;
            let namespace = r.string()?;
            let name = r.string()?;
            let replica_identity = r.u8()?;
            let n = r.i16()?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let flags = r.u8()?;
                let name = r.string()?;
                let type_oid = r.u32()?;
                let type_mod = r.i32()?;
                columns.push(RelationColumn {
                    key: flags & 1 == 1,
                    name,
                    type_oid,
                    type_mod,
                });
            }
            Message::Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            }
        }
        b'Y' => Message::Type {
            oid: r.u32()?,
            namespace: r.string()?,
            name: r.string()?,
        },
        b'I' => {
            let oid = r.u32()?;
            if r.u8()? != b'N' {
                return Err(DecodeError("insert without new tuple"));
            }
            Message::Insert {
                oid,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let oid = r.u32()?;
            let mut kind = r.u8()?;
            let mut old = None;
            if kind == b'K' || kind == b'O' {
                old = Some(r.tuple()?);
                kind = r.u8()?;
            }
            if kind != b'N' {
                return Err(DecodeError("update without new tuple"));
            }
            Message::Update {
                oid,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let oid = r.u32()?;
            let kind = r.u8()?;
            if kind != b'K' && kind != b'O' {
                return Err(DecodeError("delete without old tuple"));
            }
            Message::Delete {
                oid,
                old: r.tuple()?,
            }
        }
        b'T' => {
            let n = r.u32()?;
            let _options = r.u8()?;
            let mut oids = Vec::with_capacity(n.min(1 << 16) as usize);
            for _ in 0..n {
                oids.push(r.u32()?);
            }
            Message::Truncate { oids }
        }
        b'O' => Message::Origin,
        b'B' | b'C' | b'M' => return Ok(None),
        _ => return Err(DecodeError("unknown message tag")),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(vals: &[Option<&str>]) -> Vec<u8> {
        let mut b = (vals.len() as i16).to_be_bytes().to_vec();
        for v in vals {
            match v {
                None => b.push(b'n'),
                Some(s) => {
                    b.push(b't');
                    b.extend((s.len() as i32).to_be_bytes());
                    b.extend(s.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn relation_insert_update_delete_truncate() {
        let mut rel = vec![b'R'];
        rel.extend(16384u32.to_be_bytes());
        rel.extend(b"public\0issue\0d");
        rel.extend(2i16.to_be_bytes());
        rel.push(1);
        rel.extend(b"id\0");
        rel.extend(25u32.to_be_bytes());
        rel.extend((-1i32).to_be_bytes());
        rel.push(0);
        rel.extend(b"title\0");
        rel.extend(25u32.to_be_bytes());
        rel.extend((-1i32).to_be_bytes());
        let m = decode(Bytes::from(rel)).unwrap().unwrap();
        let Message::Relation {
            oid, name, columns, ..
        } = m
        else {
            panic!("not a relation")
        };
        assert_eq!((oid, name.as_str(), columns.len()), (16384, "issue", 2));
        assert!(columns[0].key && !columns[1].key);

        let mut ins = vec![b'I'];
        ins.extend(16384u32.to_be_bytes());
        ins.push(b'N');
        ins.extend(tuple(&[Some("1"), None]));
        assert_eq!(
            decode(Bytes::from(ins)).unwrap().unwrap(),
            Message::Insert {
                oid: 16384,
                new: vec![TupleValue::Text(Bytes::from_static(b"1")), TupleValue::Null]
            }
        );

        let mut upd = vec![b'U'];
        upd.extend(16384u32.to_be_bytes());
        upd.push(b'K');
        upd.extend(tuple(&[Some("1"), None]));
        upd.push(b'N');
        upd.extend(tuple(&[Some("2"), Some("x")]));
        let Message::Update { old, new, .. } = decode(Bytes::from(upd)).unwrap().unwrap() else {
            panic!("not an update")
        };
        assert!(old.is_some());
        assert_eq!(new[1], TupleValue::Text(Bytes::from_static(b"x")));

        let mut del = vec![b'D'];
        del.extend(16384u32.to_be_bytes());
        del.push(b'K');
        del.extend(tuple(&[Some("2"), None]));
        assert!(matches!(
            decode(Bytes::from(del)).unwrap().unwrap(),
            Message::Delete { .. }
        ));

        let mut tr = vec![b'T'];
        tr.extend(2u32.to_be_bytes());
        tr.push(0);
        tr.extend(1u32.to_be_bytes());
        tr.extend(2u32.to_be_bytes());
        assert_eq!(
            decode(Bytes::from(tr)).unwrap().unwrap(),
            Message::Truncate { oids: vec![1, 2] }
        );
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        for bad in [
            &b"I"[..],
            b"I\0\0\0\x01N\0\x01t\0\0\0\x09ab",
            b"Zxx",
            b"R\0\0",
        ] {
            assert!(decode(Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
    }
}
