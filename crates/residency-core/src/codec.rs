//! The disk encoding of state values: one version byte, then postcard. The wire format
//! (protobuf) never reaches the disk, and a value written by a newer format is refused rather
//! than misread.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The only value format so far.
pub const VALUE_FORMAT_V1: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("empty value")]
    Empty,
    #[error("unknown value format {0}")]
    UnknownFormat(u8),
    #[error("value does not decode: {0}")]
    Malformed(String),
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = vec![VALUE_FORMAT_V1];
    // Serializing our own plain data types into a Vec cannot fail; if it does, it is our bug.
    let body = postcard::to_stdvec(value).expect("state values always serialize");
    bytes.extend_from_slice(&body);
    bytes
}

/// How many bytes `encode` makes of `value`, without making them.
pub fn encoded_len<T: Serialize>(value: &T) -> usize {
    1 + postcard::experimental::serialized_size(value).expect("state values always serialize")
}

/// `items` cut, in order, into runs of at most `bytes_max` encoded bytes (a single larger item
/// stands alone), with the encoded size of all of them.
pub fn split_by_encoded_bytes<T: Serialize>(items: Vec<T>, bytes_max: usize) -> (Vec<Vec<T>>, u64) {
    let mut chunks: Vec<Vec<T>> = Vec::new();
    let mut bytes = 0;
    let mut total = 0;
    for item in items {
        let size = encoded_len(&item);
        total += size as u64;
        match chunks.last_mut() {
            Some(chunk) if bytes + size <= bytes_max => chunk.push(item),
            _ => {
                bytes = 0;
                chunks.push(vec![item]);
            }
        }
        bytes += size;
    }
    (chunks, total)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (format, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if *format != VALUE_FORMAT_V1 {
        return Err(CodecError::UnknownFormat(*format));
    }
    postcard::from_bytes(body).map_err(|error| CodecError::Malformed(error.to_string()))
}
