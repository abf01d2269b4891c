//! The dead-letter operations behind `courier dead-letters` and the admin port: list, replay
//! (a new attempt now, through the sender and the dedup store), purge.

use serde::Serialize;

use crate::delivery::Deliverer;
use crate::router::Router;
use crate::sender::Outcome;
use crate::store::{millis, DeadLetter, DeadLetterKind, StoreError};

/// Which dead letters a command applies to; empty matches all.
#[derive(Debug, Clone, Default, serde::Deserialize, Serialize)]
#[serde(default)]
pub struct Filter {
    /// Only letters of this destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// Only the letter with this key (as listed) or these letters of this event id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
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
    /// `delivered`, `failed` (kept, with the new reason) or `skipped` (cannot be replayed).
    pub outcome: String,
    pub detail: String,
}

/// The letters that match, oldest first.
pub fn list(deliverer: &Deliverer, filter: &Filter) -> Result<Vec<DeadLetter>, StoreError> {
    Ok(deliverer
        .store()
        .dead_letters()?
        .into_iter()
        .filter(|l| filter.matches(l))
        .collect())
}

/// Removes the letters that match; returns how many.
pub async fn purge(deliverer: &Deliverer, filter: &Filter) -> Result<usize, StoreError> {
    let mut removed = 0;
    for letter in list(deliverer, filter)? {
        if deliverer.store().remove_dead_letter(&letter.key)? {
            removed += 1;
        }
    }
    deliverer.store().commit().await?;
    Ok(removed)
}

/// Attempts every matching letter once, now. A delivered letter leaves the dead-letter tree (and
/// enters the dedup tree); a failed one stays, with its attempts, status and reason updated.
pub async fn replay(
    deliverer: &Deliverer,
    router: &Router,
    filter: &Filter,
) -> Result<Vec<ReplayResult>, StoreError> {
    let mut results = Vec::new();
    for mut letter in list(deliverer, filter)? {
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
            results.push(result);
            continue;
        };
        let event = stored.to_event();
        let index = match letter.kind {
            DeadLetterKind::Unroutable => match router.route(&event) {
                Ok(targets) if targets.len() == 1 => Some(targets[0]),
                Ok(_) => None,
                Err(why) => {
                    result.detail = format!("cannot replay: {why}");
                    results.push(result);
                    continue;
                }
            },
            _ => letter
                .destination
                .as_deref()
                .and_then(|d| deliverer.index_of(d)),
        };
        let Some(index) = index else {
            result.detail = format!(
                "cannot replay: destination {:?} is not configured",
                letter
                    .destination
                    .as_deref()
                    .or(event.destination_id.as_deref())
                    .unwrap_or("")
            );
            results.push(result);
            continue;
        };
        let name = router.name(index).to_string();
        result.destination = Some(name.clone());
        if deliverer.dedup().is_delivered(&name, &event.id).await? {
            deliverer.store().remove_dead_letter(&letter.key)?;
            result.outcome = "delivered".into();
            result.detail = "already delivered earlier; letter removed".into();
            results.push(result);
            continue;
        }
        match deliverer.sender().deliver(index, &event).await {
            Outcome::Delivered { status } => {
                deliverer.dedup().record(&name, &event.id).await?;
                deliverer.store().remove_dead_letter(&letter.key)?;
                result.outcome = "delivered".into();
                result.detail = format!("HTTP {status}");
            }
            Outcome::Failed { status, reason, .. } => {
                letter.attempts += 1;
                letter.last_status = status;
                letter.reason = format!("replay failed: {reason}");
                letter.at_ms = millis(std::time::SystemTime::now());
                deliverer.store().update_dead_letter(&letter)?;
                result.outcome = "failed".into();
                result.detail = reason;
            }
        }
        results.push(result);
    }
    deliverer.store().commit().await?;
    Ok(results)
}
