//! The dead-letter operations behind `courier dead-letters` and the admin port: list, replay
//! (a new attempt now, through the same attempt path as every delivery), purge.

use std::time::Duration;

use serde::Serialize;

use crate::delivery::{Deliverer, Origin, Settled};
use crate::destination::{DestinationSet, Destinations};
use crate::store::{DeadLetter, DeadLetterKind, LetterKey, StoreError};

/// Which dead letters a command applies to: those after `after` (all when `None`) that match
/// `destination` and `id`, oldest first, at most `limit` of them (no limit when `None`).
///
/// Unknown fields are refused: through the admin port, a misspelt `destination` in a purge
/// would otherwise purge every letter.
#[derive(Debug, Clone, Default, serde::Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Filter {
    /// Only letters of this destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// Only the letter with this key (as listed) or these letters of this event id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Only letters after this key (as listed): where the next page of a listing starts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<LetterKey>,
    /// At most this many letters, the oldest that match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

impl Filter {
    fn matches(&self, letter: &DeadLetter) -> bool {
        if let Some(d) = &self.destination {
            if letter.destination.as_deref() != Some(d.as_str()) {
                return false;
            }
        }
        if let Some(id) = &self.id {
            if letter.key != *id && letter.event_id.as_deref() != Some(id.as_str()) {
                return false;
            }
        }
        true
    }
}

/// What a replay did with one letter.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ReplayResult {
    pub key: String,
    pub event_id: Option<String>,
    pub destination: Option<String>,
    /// `delivered`, `failed` (kept, with the new reason), `blocked` (not attempted: the
    /// destination's circuit is open; kept as it was) or `skipped` (cannot be replayed).
    pub outcome: String,
    pub detail: String,
}

/// How many letters a purge or a replay takes from the store at a time.
const PAGE: usize = 256;
/// How many letters a purge or a replay reads before it lets other tasks run.
const VISITS: usize = 4_096;

/// The letters that match, oldest first. With no `limit`, every match is held in memory: a
/// caller facing a large tree pages with `limit` and `after`.
pub fn list(deliverer: &Deliverer, filter: &Filter) -> Result<Vec<DeadLetter>, StoreError> {
    deliverer.store().scan_dead_letters(
        filter.after.as_ref(),
        None,
        filter.limit.unwrap_or(usize::MAX),
        |l| filter.matches(l),
    )
}

/// The matching letters, one page at a time, oldest first, up to the letter that was newest
/// when the pages began: letters dead-lettered meanwhile are not taken in, so a replay or a
/// purge ends even while new letters keep coming.
struct Pages<'a> {
    deliverer: &'a Deliverer,
    filter: &'a Filter,
    after: Option<LetterKey>,
    until: Option<LetterKey>,
    left: usize,
}

impl<'a> Pages<'a> {
    fn new(deliverer: &'a Deliverer, filter: &'a Filter) -> Result<Pages<'a>, StoreError> {
        let until = deliverer.store().newest_dead_letter()?;
        Ok(Pages {
            deliverer,
            filter,
            after: filter.after,
            left: if until.is_some() {
                filter.limit.unwrap_or(usize::MAX)
            } else {
                0
            },
            until,
        })
    }

    /// The next page, which may be empty when few letters matched among those read; `None`
    /// once every matching letter was handed out.
    fn next(&mut self) -> Result<Option<Vec<DeadLetter>>, StoreError> {
        if self.left == 0 {
            return Ok(None);
        }
        let store = self.deliverer.store();
        let (page, resume) = store.scan_dead_letters_for(
            self.after.as_ref(),
            self.until.as_ref(),
            self.left.min(PAGE),
            VISITS,
            |l| self.filter.matches(l),
        )?;
        self.left -= page.len();
        match resume {
            Some(key) => self.after = Some(key),
            None => self.left = 0,
        }
        Ok(Some(page))
    }
}

/// Removes the letters that match; returns how many.
pub async fn purge(deliverer: &Deliverer, filter: &Filter) -> Result<usize, StoreError> {
    let mut removed = 0;
    let mut pages = Pages::new(deliverer, filter)?;
    while let Some(page) = pages.next()? {
        for letter in page {
            if deliverer.store().remove_dead_letter(&letter.key)? {
                removed += 1;
            }
        }
        tokio::task::yield_now().await;
    }
    deliverer.store().try_commit().await?;
    Ok(removed)
}

/// How a replay treats the destination's policy.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize, Serialize)]
#[serde(default)]
pub struct ReplayOptions {
    /// Go through an open circuit and past the rate limit (`--force`, `?force=true`).
    pub force: bool,
}

/// The query of `POST /dead-letters/replay`: a [`Filter`] and the [`ReplayOptions`], unknown
/// fields refused (serde cannot refuse them across two flattened structs).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplayQuery {
    pub destination: Option<String>,
    pub id: Option<String>,
    pub after: Option<LetterKey>,
    pub limit: Option<usize>,
    pub force: bool,
}

impl ReplayQuery {
    /// Which letters, and how.
    pub fn split(self) -> (Filter, ReplayOptions) {
        let ReplayQuery {
            destination,
            id,
            after,
            limit,
            force,
        } = self;
        (
            Filter {
                destination,
                id,
                after,
                limit,
            },
            ReplayOptions { force },
        )
    }
}

/// How long a replay waits for a failing store before it answers with the store's error.
pub const REPLAY_STORE_PATIENCE: Duration = Duration::from_secs(10);

/// Attempts every matching letter once, now, through its destination's circuit and rate limit
/// (unless `options.force`). A delivered letter leaves the dead-letter tree (and enters the
/// dedup record); a failed one stays, with its attempts, status and reason updated; one its
/// destination's open circuit blocked stays as it was. A store that keeps failing for
/// [`REPLAY_STORE_PATIENCE`] ends the replay with [`StoreError::Failing`]; the letters it had
/// not reached stay as they were. Each letter goes by the destinations in force when its turn
/// comes: a replay of many letters may outlast a reload.
pub async fn replay(
    deliverer: &Deliverer,
    destinations: &Destinations,
    filter: &Filter,
    options: ReplayOptions,
) -> Result<Vec<ReplayResult>, StoreError> {
    let mut results = Vec::new();
    let mut pages = Pages::new(deliverer, filter)?;
    while let Some(page) = pages.next()? {
        for letter in &page {
            let set = destinations.current();
            results.push(replay_one(deliverer, &set, letter, options).await?);
        }
        tokio::task::yield_now().await;
    }
    deliverer.store().try_commit().await?;
    Ok(results)
}

/// Replays one letter (see [`replay`]).
async fn replay_one(
    deliverer: &Deliverer,
    destinations: &DestinationSet,
    letter: &DeadLetter,
    options: ReplayOptions,
) -> Result<ReplayResult, StoreError> {
    let mut result = ReplayResult {
        key: letter.key.clone(),
        event_id: letter.event_id.clone(),
        destination: letter.destination.clone(),
        outcome: "skipped".into(),
        detail: String::new(),
    };
    let Some(stored) = letter.event.clone() else {
        result.detail = format!(
            "cannot replay: the message could not be parsed ({}); its raw bytes are kept \
             (list --json shows them): fix the producer and publish it again",
            letter.reason
        );
        return Ok(result);
    };
    let event = stored.to_event();
    let dest = match letter.kind {
        // Routed again, with the configuration of now; a crashed attempt at one destination
        // goes back to that destination, as a failed one does.
        DeadLetterKind::Unroutable | DeadLetterKind::Crashed
            if letter.kind == DeadLetterKind::Unroutable || letter.destination.is_none() =>
        {
            match destinations.route(&event) {
                Ok(targets) if targets.len() == 1 => Some(targets[0]),
                Ok(targets) if targets.len() > 1 => {
                    result.detail = format!(
                        "cannot replay: the event routes to {} destinations and a replay goes \
                         to one; publish it again",
                        targets.len()
                    );
                    return Ok(result);
                }
                Ok(_) => None,
                Err(why) => {
                    result.detail = format!("cannot replay: {why}");
                    return Ok(result);
                }
            }
        }
        _ => letter
            .destination
            .as_deref()
            .and_then(|d| destinations.get(d)),
    };
    let Some(dest) = dest else {
        result.detail = format!(
            "cannot replay: destination {:?} is not configured",
            letter
                .destination
                .as_deref()
                .or(event.destination_id.as_deref())
                .unwrap_or("")
        );
        return Ok(result);
    };
    result.destination = Some(dest.id().to_string());
    let origin = Origin::Replay {
        letter,
        force: options.force,
    };
    // The attempt waits for a failing store as a queue message's would; the operator gets
    // an error instead once it has failed for a while. Dropping the attempt then is safe:
    // its letter stays until a later replay, which dedup keeps from POSTing twice once the
    // delivery was recorded.
    let store = deliverer.store();
    let settled = tokio::select! {
        settled = deliverer.attempt(dest, &event, origin) => settled,
        error = store.failing_for(REPLAY_STORE_PATIENCE) => {
            // The attempt's wait was what reopened the store once the disk is fixed. Without
            // someone else doing that, a worker with no message under way would keep its
            // store closed, and stay not ready, until the next message.
            let store = store.clone();
            tokio::spawn(async move { store.commit().await });
            return Err(error);
        }
    };
    let (outcome, detail) = match settled {
        Settled::Delivered { status } => ("delivered", format!("HTTP {status}")),
        Settled::Duplicate => (
            "delivered",
            "already delivered earlier; letter removed".into(),
        ),
        Settled::StillDead { reason, .. } => ("failed", reason),
        Settled::Blocked { reason } => (
            "blocked",
            format!(
                "not attempted: {reason}; the letter stays (replay it again then, or force it \
                 with --force, ?force=true on the admin port)"
            ),
        ),
        // A replay waits for its token and its slot, and its failures keep the letter: it
        // ends in one of the four above.
        other => ("failed", format!("{other:?}")),
    };
    result.outcome = outcome.into();
    result.detail = detail;
    Ok(result)
}
