//! Who a request belongs to once its credential checked out.

/// The authenticated caller: a user name and the groups it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    pub user: String,
    pub groups: Vec<String>,
}

impl Identity {
    /// Groups joined with commas, the form used in headers and usage events.
    pub fn groups_csv(&self) -> String {
        self.groups.join(",")
    }
}
