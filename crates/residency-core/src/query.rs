//! The read path of the core: decode what the view holds.

use residency_types::{Placement, UserId};

use crate::{CoreError, KvRead, codec, keys};

pub fn lookup<V: KvRead>(
    view: &V,
    user_id: &UserId,
) -> Result<Option<Placement>, CoreError<V::Error>> {
    let Some(bytes) = view
        .get(&keys::placement_key(user_id))
        .map_err(CoreError::Read)?
    else {
        return Ok(None);
    };
    let placement: Placement = codec::decode(&bytes)?;
    assert_eq!(
        &placement.user_id, user_id,
        "placement stored under another user's key"
    );
    Ok(Some(placement))
}
