//! Fencing tokens: the number a holder passes to every resource the lock protects.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A fencing token: strictly greater than every token issued before for the same lock.
///
/// Pass it with every write to the protected resource and have the resource reject writes that
/// carry a smaller token than one it has already seen: that is what makes a lock safe even when
/// a paused holder wakes up after losing it. Serializes as a bare JSON number.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct FencingToken(u64);

impl FencingToken {
    /// Wraps a raw token (as printed by the CLI or stored by a resource).
    pub const fn new(value: u64) -> Self {
        Self(value)
    }

    /// The raw number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl From<u64> for FencingToken {
    fn from(value: u64) -> Self {
        Self(value)
    }
}

impl From<FencingToken> for u64 {
    fn from(token: FencingToken) -> Self {
        token.0
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::str::FromStr for FencingToken {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_displays_and_serializes_as_a_number() {
        let (a, b) = (FencingToken::new(7), FencingToken::from(12));
        assert!(a < b);
        assert_eq!(b.to_string(), "12");
        assert_eq!(serde_json::to_string(&a).unwrap(), "7");
        assert_eq!(serde_json::from_str::<FencingToken>("12").unwrap(), b);
        assert_eq!("7".parse::<FencingToken>().unwrap(), a);
    }
}
