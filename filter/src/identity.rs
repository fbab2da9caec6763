//! Who a request belongs to once its credential checked out.

use std::borrow::Cow;

/// The authenticated caller: a user name and the groups it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    pub user: String,
    pub groups: Vec<String>,
}

impl Identity {
    /// Groups joined with commas, the form used in headers and usage events (borrowed
    /// when there is at most one: no allocation per request for the common case).
    pub fn groups_csv(&self) -> Cow<'_, str> {
        match self.groups.as_slice() {
            [] => Cow::Borrowed(""),
            [one] => Cow::Borrowed(one),
            many => Cow::Owned(many.join(",")),
        }
    }
}
