//! Validated identifiers. A value of one of these types has passed its rules; the only way to
//! build one from outside is `parse`, and deserialization goes through it too.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::limits::{
    CALLER_ID_BYTES_MAX, LOCATION_ID_BYTES_MAX, REASON_TEXT_BYTES_MAX, REQUEST_ID_BYTES_MAX,
    USER_ID_BYTES_MAX,
};
use crate::reason::{ReasonCode, ValidationError};

/// The rule one kind of token follows.
struct TokenRule {
    field: &'static str,
    code: ReasonCode,
    bytes_max: usize,
    allowed: fn(u8) -> bool,
    allowed_text: &'static str,
}

impl TokenRule {
    fn check(&self, text: &str) -> Result<(), ValidationError> {
        if text.is_empty() {
            return Err(ValidationError::new(
                self.code,
                self.field,
                "must not be empty",
            ));
        }
        if text.len() > self.bytes_max {
            return Err(ValidationError::new(
                self.code,
                self.field,
                format!(
                    "is {} bytes, more than the limit of {}",
                    text.len(),
                    self.bytes_max
                ),
            ));
        }
        if let Some(position) = text.bytes().position(|byte| !(self.allowed)(byte)) {
            return Err(ValidationError::new(
                self.code,
                self.field,
                format!(
                    "has a character not in {} at byte {position}",
                    self.allowed_text
                ),
            ));
        }
        Ok(())
    }
}

fn is_user_id_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b':' | b'@' | b'-')
}

fn is_location_id_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b':' | b'/' | b'-')
}

fn is_caller_id_byte(byte: u8) -> bool {
    byte.is_ascii_graphic()
}

const USER_ID_RULE: TokenRule = TokenRule {
    field: "user_id",
    code: ReasonCode::InvalidUserId,
    bytes_max: USER_ID_BYTES_MAX,
    allowed: is_user_id_byte,
    allowed_text: "[A-Za-z0-9._:@-]",
};

const LOCATION_ID_RULE: TokenRule = TokenRule {
    field: "location_id",
    code: ReasonCode::InvalidLocationId,
    bytes_max: LOCATION_ID_BYTES_MAX,
    allowed: is_location_id_byte,
    allowed_text: "[A-Za-z0-9._:/-]",
};

const REQUEST_ID_RULE: TokenRule = TokenRule {
    field: "request_id",
    code: ReasonCode::InvalidRequestId,
    bytes_max: REQUEST_ID_BYTES_MAX,
    allowed: is_user_id_byte,
    allowed_text: "[A-Za-z0-9._:@-]",
};

const CALLER_ID_RULE: TokenRule = TokenRule {
    field: "caller",
    code: ReasonCode::InvalidCallerId,
    bytes_max: CALLER_ID_BYTES_MAX,
    allowed: is_caller_id_byte,
    allowed_text: "printable ASCII without spaces",
};

/// Declares a validated string newtype with `parse`, `as_str`, Display and serde through `parse`.
macro_rules! validated_string {
    ($(#[$doc:meta])* $name:ident, $rule:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            pub fn parse(text: impl Into<String>) -> Result<Self, ValidationError> {
                let text = text.into();
                $rule.check(&text)?;
                Ok($name(text))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                $name::parse(text).map_err(serde::de::Error::custom)
            }
        }
    };
}

validated_string!(
    /// An opaque user id: 1..=128 bytes of `[A-Za-z0-9._:@-]`.
    UserId,
    USER_ID_RULE
);
validated_string!(
    /// A storage location id such as `us-east-1/oci-ashburn/pg-042`.
    LocationId,
    LOCATION_ID_RULE
);
validated_string!(
    /// The idempotency key of a write: a retried write with the same id applies once.
    RequestId,
    REQUEST_ID_RULE
);
validated_string!(
    /// Who made a write. Until mutual TLS exists it is the identity the client states.
    CallerId,
    CALLER_ID_RULE
);

/// Free text saying why a write was made: at most 512 bytes, no control characters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct ReasonText(String);

impl ReasonText {
    pub fn parse(text: impl Into<String>) -> Result<Self, ValidationError> {
        let text = text.into();
        let field = "reason";
        if text.len() > REASON_TEXT_BYTES_MAX {
            return Err(ValidationError::new(
                ReasonCode::InvalidReasonText,
                field,
                format!(
                    "is {} bytes, more than the limit of {REASON_TEXT_BYTES_MAX}",
                    text.len()
                ),
            ));
        }
        if text.chars().any(char::is_control) {
            return Err(ValidationError::new(
                ReasonCode::InvalidReasonText,
                field,
                "must not contain control characters",
            ));
        }
        Ok(ReasonText(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for ReasonText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        ReasonText::parse(text).map_err(serde::de::Error::custom)
    }
}

/// The officially assigned ISO 3166-1 alpha-2 codes (249 of them).
const ISO_3166_ALPHA2: &str = "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ \
BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ \
CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ \
DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR \
GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU \
ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ \
LA LB LC LI LK LR LS LT LU LV LY \
MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ \
NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA \
RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ \
TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ \
VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW";

/// A jurisdiction: an officially assigned ISO 3166-1 alpha-2 code, upper case (`US`, `CA`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Jurisdiction([u8; 2]);

/// The assigned codes as bits, built from `ISO_3166_ALPHA2` at compile time: bit `second - 'A'`
/// of entry `first - 'A'`. Every placement decoded from disk parses its residency, so the
/// check is one load and a mask instead of a walk through the list.
const ASSIGNED_CODES: [u32; 26] = assigned_codes();

const fn assigned_codes() -> [u32; 26] {
    let bytes = ISO_3166_ALPHA2.as_bytes();
    let mut table = [0_u32; 26];
    let mut i = 0;
    while i + 1 < bytes.len() {
        let (first, second) = (bytes[i], bytes[i + 1]);
        if first.is_ascii_uppercase() && second.is_ascii_uppercase() {
            table[(first - b'A') as usize] |= 1 << (second - b'A');
            i += 2;
        } else {
            i += 1;
        }
    }
    table
}

impl Jurisdiction {
    pub const US: Jurisdiction = Jurisdiction(*b"US");

    /// Accepts exactly two upper-case letters that ISO 3166-1 assigns; `us` and `USA` are refused
    /// rather than guessed at, so every replica and every audit record spells a code one way.
    pub fn parse(text: &str) -> Result<Self, ValidationError> {
        let field = "jurisdiction";
        let bytes = text.as_bytes();
        let well_formed = bytes.len() == 2 && bytes.iter().all(u8::is_ascii_uppercase);
        if !well_formed {
            return Err(ValidationError::new(
                ReasonCode::InvalidJurisdiction,
                field,
                format!("{text:?} is not two upper-case letters (ISO 3166-1 alpha-2, e.g. US)"),
            ));
        }
        if ASSIGNED_CODES[usize::from(bytes[0] - b'A')] & (1 << (bytes[1] - b'A')) == 0 {
            return Err(ValidationError::new(
                ReasonCode::InvalidJurisdiction,
                field,
                format!("{text:?} is not an assigned ISO 3166-1 alpha-2 code"),
            ));
        }
        Ok(Jurisdiction([bytes[0], bytes[1]]))
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("a jurisdiction is built from ASCII letters only")
    }

    /// Every assigned code, in alphabetical order.
    pub fn all() -> impl Iterator<Item = Jurisdiction> {
        ISO_3166_ALPHA2.split_whitespace().map(|code| {
            let bytes = code.as_bytes();
            Jurisdiction([bytes[0], bytes[1]])
        })
    }
}

impl fmt::Debug for Jurisdiction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Jurisdiction({})", self.as_str())
    }
}

impl fmt::Display for Jurisdiction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Jurisdiction {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Jurisdiction {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // A visitor, so decoding a placement allocates no String for its two letters.
        struct Code;
        impl serde::de::Visitor<'_> for Code {
            type Value = Jurisdiction;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an ISO 3166-1 alpha-2 code")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Jurisdiction, E> {
                Jurisdiction::parse(text).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused_with<T: fmt::Debug>(result: Result<T, ValidationError>) -> ReasonCode {
        result.expect_err("input should have been refused").code
    }

    #[test]
    fn user_ids_follow_their_character_and_length_rules() {
        for good in [
            "u",
            "user-42",
            "a.b_c:d@e-f",
            &"x".repeat(USER_ID_BYTES_MAX),
        ] {
            assert_eq!(UserId::parse(good).expect("valid").as_str(), good);
        }
        for bad in [
            "",
            "has space",
            "slash/no",
            "é",
            "new\nline",
            &"x".repeat(USER_ID_BYTES_MAX + 1),
        ] {
            assert_eq!(
                refused_with(UserId::parse(bad)),
                ReasonCode::InvalidUserId,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn location_ids_allow_slashes_but_not_spaces() {
        assert!(LocationId::parse("us-east-1/oci-ashburn/pg-042").is_ok());
        assert_eq!(
            refused_with(LocationId::parse("us east")),
            ReasonCode::InvalidLocationId
        );
        assert_eq!(
            refused_with(LocationId::parse("")),
            ReasonCode::InvalidLocationId
        );
        let long = "l".repeat(LOCATION_ID_BYTES_MAX + 1);
        assert_eq!(
            refused_with(LocationId::parse(long)),
            ReasonCode::InvalidLocationId
        );
    }

    #[test]
    fn request_and_caller_ids_are_validated() {
        assert!(RequestId::parse("req-1").is_ok());
        assert_eq!(
            refused_with(RequestId::parse("")),
            ReasonCode::InvalidRequestId
        );
        assert!(CallerId::parse("spiffe://residency.local/service/payments").is_ok());
        assert_eq!(
            refused_with(CallerId::parse("two words")),
            ReasonCode::InvalidCallerId
        );
    }

    #[test]
    fn reason_text_is_bounded_and_printable() {
        assert!(ReasonText::parse("").is_ok());
        assert!(ReasonText::parse("migration to us-west, ticket OPS-12").is_ok());
        assert_eq!(
            refused_with(ReasonText::parse("a\u{0}b")),
            ReasonCode::InvalidReasonText
        );
        let long = "r".repeat(REASON_TEXT_BYTES_MAX + 1);
        assert_eq!(
            refused_with(ReasonText::parse(long)),
            ReasonCode::InvalidReasonText
        );
    }

    #[test]
    fn jurisdictions_are_assigned_iso_codes_in_upper_case() {
        assert_eq!(ISO_3166_ALPHA2.split_whitespace().count(), 249);
        assert_eq!(Jurisdiction::parse("US").expect("valid"), Jurisdiction::US);
        // The bit table says exactly what the list says, for every pair of letters.
        for first in b'A'..=b'Z' {
            for second in b'A'..=b'Z' {
                let text = String::from_utf8(vec![first, second]).expect("ASCII");
                let listed = ISO_3166_ALPHA2.split_whitespace().any(|code| code == text);
                assert_eq!(Jurisdiction::parse(&text).is_ok(), listed, "{text}");
            }
        }
        assert_eq!(Jurisdiction::parse("CA").expect("valid").as_str(), "CA");
        for bad in ["", "us", "USA", "U", "XX", "ZZ", "U1", "UK"] {
            let code = refused_with(Jurisdiction::parse(bad));
            assert_eq!(code, ReasonCode::InvalidJurisdiction, "{bad:?}");
        }
    }

    #[test]
    fn deserialization_goes_through_validation() {
        let refused: Result<UserId, _> = serde_json::from_str("\"bad id\"");
        assert!(refused.is_err());
        let accepted: Jurisdiction = serde_json::from_str("\"US\"").expect("valid");
        assert_eq!(accepted, Jurisdiction::US);
    }
}
