//! Recovery of in-flight migrations when the controller starts.
//!
//! A migration the store calls active (pending or running) when ferryd
//! starts was left by a previous run that died mid-saga: no task of this
//! process drives it. Each one is settled by explicit rules, after libvirt's
//! recovery table (`qemuMigrationSrcRecover`/`qemuProcessRecoverMigration`),
//! from two facts that cannot be wrong — the store's owner of the VM (the
//! commit is the owner compare-and-swap, nothing else) and what the two
//! agents report — never from the saga's step log alone, which can lag the
//! world by one step:
//!
//! | the store's owner | the destination's guest | action |
//! |---|---|---|
//! | destination (committed) | any | roll forward: finish the destination (resume), retire the source; `completed` |
//! | source (not committed) | has run (RESUME seen) | the guest must not run twice: commit, finish, retire; `completed` |
//! | source, but the source is in post-copy | any | the source can never run it again: commit, resume the destination, drive post-copy to its end (reconnecting a broken link), retire; `completed` |
//! | source | never ran, or no such incoming VM | roll back: cancel on the source (its guest resumes), abort the destination; `failed` |
//! | either | a host does not answer | unknown: ask again later (phase `recovering`), never guess |
//!
//! The source's guest only ever resumes through the roll-back, and the
//! destination's only through the roll-forward, so a recovery that is
//! itself interrupted (the controller dies again) is simply recovered
//! again: every action here is idempotent.

use std::sync::Arc;
use std::time::Duration;

use ferry_api::{Client, MigrationStatus};
use tracing::{info, warn};

use crate::controller::{unix_now, unix_now_ms, Controller};
use crate::migrate::{commit, report_of, store_status};
use crate::store::{MigrationFilter, MigrationRecord, StepRecord, StepState, StoreError};

/// How often an unsettled migration is looked at again.
const RETRY_EVERY: Duration = Duration::from_secs(2);
/// How often the janitor looks for pending clean-ups.
const JANITOR_EVERY: Duration = Duration::from_secs(3);

/// How a recovery ended.
enum Settled {
    Completed(String),
    RolledBack(String),
}

impl Controller {
    /// Settles every migration a previous run left active; called once when
    /// ferryd starts. Each runs in a task of its own and retries until both
    /// hosts answer.
    pub async fn recover(self: &Arc<Self>) {
        let active = match self
            .store
            .list_migrations(&MigrationFilter {
                vm: None,
                active_only: true,
            })
            .await
        {
            Ok(active) => active,
            Err(error) => {
                warn!(%error, "cannot list the migrations to recover");
                return;
            }
        };
        for record in active {
            info!(migration = %record.id, vm = %record.vm, phase = %record.phase, "recovering a migration left in flight");
            let controller = self.clone();
            if crate::migrate::report_of(&record).kind != ferry_api::MigrationKind::Live {
                tokio::spawn(controller.recover_storage_job(record));
                continue;
            }
            tokio::spawn(async move { controller.recover_one(record).await });
        }
    }

    async fn recover_one(self: Arc<Self>, record: MigrationRecord) {
        let id = record.id;
        let mut attempt: u64 = 0;
        loop {
            attempt += 1;
            match self.settle(&record).await {
                Ok(settled) => {
                    let (status, note) = match settled {
                        Settled::Completed(note) => (MigrationStatus::Completed, note),
                        Settled::RolledBack(note) => (MigrationStatus::Failed, note),
                    };
                    self.close(id, status, note).await;
                    return;
                }
                Err(why) => {
                    if attempt == 1 || attempt.is_multiple_of(30) {
                        warn!(migration = %id, attempt, %why, "recovery cannot settle the migration yet; retrying");
                    }
                    self.note_recovering(id, &why).await;
                    tokio::time::sleep(RETRY_EVERY).await;
                }
            }
        }
    }

    /// One attempt at the table in the module docs.
    async fn settle(&self, record: &MigrationRecord) -> Result<Settled, String> {
        let owner = self
            .store
            .get_vm(&record.vm)
            .await
            .map_err(|e| format!("reading the VM's owner: {e}"))?
            .host;
        let src = self
            .agent(&record.source)
            .await
            .map_err(|e| e.to_string())?;
        let dst = self
            .agent(&record.destination)
            .await
            .map_err(|e| e.to_string())?;
        if owner == record.destination {
            self.roll_forward(record, &src, &dst).await?;
            return Ok(Settled::Completed(format!(
                "the controller restarted after the commit; the recovery finished the \
                 migration (the VM runs on {})",
                record.destination
            )));
        }
        if owner != record.source {
            return Err(format!(
                "the store says {} owns {}, neither the source {} nor the destination {}",
                owner, record.vm, record.source, record.destination
            ));
        }
        // Not committed, but past post-copy's point of no return: the
        // source can never run the guest again, so forward is the only way.
        let in_postcopy = matches!(
            src.outgoing_status(&record.vm).await,
            Ok(status) if status.phase.starts_with("postcopy")
        );
        if in_postcopy {
            commit(self, &record.vm, &record.destination).await?;
            self.roll_forward(record, &src, &dst).await?;
            return Ok(Settled::Completed(format!(
                "the controller restarted during post-copy; the recovery committed to {} and \
                 finished the migration",
                record.destination
            )));
        }
        // Not committed: did the guest ever run on the destination?
        let ran_there = match dst.incoming_status(record.id).await {
            Ok(status) => status.resumed_at_us.is_some() || status.run_state == "running",
            Err(error) if is_gone(&error) => false,
            Err(error) => {
                return Err(format!(
                    "asking the destination {}: {}",
                    record.destination,
                    ferry_api::error_chain(&error)
                ))
            }
        };
        if ran_there {
            commit(self, &record.vm, &record.destination).await?;
            self.roll_forward(record, &src, &dst).await?;
            return Ok(Settled::Completed(format!(
                "the controller restarted before the commit, but the guest had already run on \
                 {}; the recovery committed there and retired the source",
                record.destination
            )));
        }
        self.roll_back(record, &src, &dst).await?;
        Ok(Settled::RolledBack(format!(
            "the controller restarted during the migration (phase {}); the recovery rolled it \
             back and {} keeps running on {}",
            record.phase, record.vm, record.source
        )))
    }

    /// Committed: the destination resumes, the source goes (with the disks
    /// that were copied).
    async fn roll_forward(
        &self,
        record: &MigrationRecord,
        src: &Client,
        dst: &Client,
    ) -> Result<(), String> {
        let vm = &record.vm;
        let running_there = matches!(
            dst.get_vm(vm).await,
            Ok(info) if info.state == ferry_api::VmState::Running
        );
        if !running_there {
            dst.incoming_finish(record.id).await.map_err(|error| {
                format!(
                    "resuming {vm} on {}: {}",
                    record.destination,
                    ferry_api::error_chain(&error)
                )
            })?;
        }
        // In post-copy the source still holds pages the guest has not
        // fetched: it goes only once the last one has arrived.
        if matches!(
            src.outgoing_status(vm).await,
            Ok(status) if status.phase.starts_with("postcopy")
        ) {
            crate::migrate::drive_postcopy(vm, record.id, src, dst, |_| {}).await?;
        }
        let copied = copied_disks(&record.steps);
        match src.outgoing_retire(vm, &copied).await {
            Ok(()) => Ok(()),
            Err(error) if is_gone(&error) => Ok(()),
            Err(error) => Err(format!(
                "retiring {vm} on {}: {}",
                record.source,
                ferry_api::error_chain(&error)
            )),
        }
    }

    /// Not committed and never run on the destination: the source resumes,
    /// the destination forgets.
    async fn roll_back(
        &self,
        record: &MigrationRecord,
        src: &Client,
        dst: &Client,
    ) -> Result<(), String> {
        let vm = &record.vm;
        if let Err(error) = src.outgoing_cancel(vm).await {
            // Nothing to cancel is fine as long as the guest runs there.
            let runs = matches!(
                src.get_vm(vm).await,
                Ok(info) if info.state == ferry_api::VmState::Running
            );
            if !runs {
                return Err(format!(
                    "resuming {vm} on {}: {}",
                    record.source,
                    ferry_api::error_chain(&error)
                ));
            }
        }
        dst.incoming_abort(record.id).await.map_err(|error| {
            format!(
                "cleaning {} of {vm}: {}",
                record.destination,
                ferry_api::error_chain(&error)
            )
        })
    }

    /// Records that the recovery is waiting, so `migration show` says why.
    async fn note_recovering(&self, id: uuid::Uuid, why: &str) {
        self.update_record(id, |record| {
            record.phase = "recovering".to_string();
            let mut report = report_of(record);
            report.phase = "recovering".to_string();
            report.error = Some(format!("recovering after a controller restart: {why}"));
            record.report = serde_json::to_value(&report).unwrap_or_default();
        })
        .await;
    }

    /// Ends the migration with `status`, a recovery step, and `note`.
    async fn close(&self, id: uuid::Uuid, status: MigrationStatus, note: String) {
        info!(migration = %id, %status, %note, "migration recovered");
        self.update_record(id, |record| {
            let now = unix_now();
            record.steps.push(StepRecord {
                name: "recover".to_string(),
                state: StepState::Done,
                started_at: now,
                finished_at: Some(now),
                detail: serde_json::json!({ "outcome": status.to_string(), "note": note }),
            });
            let mut report = report_of(record);
            report.status = status;
            report.phase = "recovered".to_string();
            report.error = Some(note.clone());
            report.finished_at_ms = Some(unix_now_ms());
            record.phase = "recovered".to_string();
            record.status = store_status(status);
            record.error = Some(note.clone());
            record.report = serde_json::to_value(&report).unwrap_or_default();
        })
        .await;
    }

    /// Read, change, compare-and-swap, re-read on a lost race.
    async fn update_record(&self, id: uuid::Uuid, change: impl Fn(&mut MigrationRecord)) {
        for _ in 0..10 {
            let mut record = match self.store.get_migration(id).await {
                Ok(record) => record,
                Err(error) => {
                    warn!(migration = %id, %error, "cannot read the migration being recovered");
                    return;
                }
            };
            change(&mut record);
            record.updated_at = unix_now();
            match self
                .store
                .update_migration(&record, record.generation)
                .await
            {
                Ok(_) => return,
                Err(StoreError::Conflict { .. }) => continue,
                Err(error) => {
                    warn!(migration = %id, %error, "cannot record the recovery");
                    return;
                }
            }
        }
    }
}

impl Controller {
    /// Finishes what ended migrations left pending because a host did not
    /// answer: an undo that failed (the destination's incoming VM still
    /// there, or the source's migration not cancelled), a finish or a
    /// retire after the commit that ran out of retries. Runs for the life
    /// of the controller, so a host that comes back is cleaned then — and
    /// after a controller restart, from the steps in the store.
    pub async fn janitor(self: Arc<Self>) {
        loop {
            tokio::time::sleep(JANITOR_EVERY).await;
            self.tidy().await;
        }
    }

    async fn tidy(&self) {
        let Ok(all) = self
            .store
            .list_migrations(&MigrationFilter::default())
            .await
        else {
            return;
        };
        for record in all.iter().filter(|r| !r.status.is_active()) {
            for step in record.steps.iter().filter(|s| is_pending(s)) {
                // A retire waits for the destination's finish.
                let after = step.detail.get("after").and_then(|a| a.as_str());
                if after.is_some_and(|after| {
                    record
                        .steps
                        .iter()
                        .any(|other| other.name == after && is_pending(other))
                }) {
                    continue;
                }
                match self.settle_pending(record, step).await {
                    Ok(Tidied::Reverted) => {
                        warn!(migration = %record.id, "the destination was lost before the guest ran there; the commit was reverted and the VM resumed on the source");
                        self.update_record(record.id, |record| {
                            for step in record.steps.iter_mut().filter(|s| is_pending(s)) {
                                step.state = StepState::Undone;
                                step.finished_at = Some(unix_now());
                                step.detail = serde_json::json!({ "reverted": true });
                            }
                            let mut report = report_of(record);
                            report.error = Some(format!(
                                "the destination {} was lost after the commit, before the guest ran \
                                 there: the commit was reverted and {} runs on {} again",
                                record.destination, record.vm, record.source
                            ));
                            record.error = report.error.clone();
                            record.report = serde_json::to_value(&report).unwrap_or_default();
                        })
                        .await;
                        break;
                    }
                    Ok(Tidied::Done) => {
                        info!(migration = %record.id, step = %step.name, "pending clean-up done");
                        let name = step.name.clone();
                        self.update_record(record.id, |record| {
                            if let Some(step) = record
                                .steps
                                .iter_mut()
                                .rev()
                                .find(|s| s.name == name && is_pending(s))
                            {
                                step.state = if step.detail.get("undo_error").is_some() {
                                    StepState::Undone
                                } else {
                                    StepState::Done
                                };
                                step.finished_at = Some(unix_now());
                                step.detail = serde_json::json!({ "settled_later": true });
                            }
                        })
                        .await;
                    }
                    Err(why) => {
                        tracing::debug!(migration = %record.id, step = %step.name, %why, "pending clean-up not possible yet");
                    }
                }
            }
        }
    }

    /// One pending step, done now if its host answers.
    async fn settle_pending(
        &self,
        record: &MigrationRecord,
        step: &StepRecord,
    ) -> Result<Tidied, String> {
        if step.name == "finish_destination" {
            let dst = self
                .agent(&record.destination)
                .await
                .map_err(|e| e.to_string())?;
            if let Ok(status) = dst.incoming_status(record.id).await {
                if crate::migrate::destination_lost(&status) {
                    // The paused source is the only copy: owner back,
                    // source resumed, destination forgotten.
                    let src = self
                        .agent(&record.source)
                        .await
                        .map_err(|e| e.to_string())?;
                    commit(self, &record.vm, &record.source).await?;
                    src.outgoing_cancel(&record.vm)
                        .await
                        .map_err(|e| ferry_api::error_chain(&e))?;
                    dst.incoming_abort(record.id)
                        .await
                        .map_err(|e| ferry_api::error_chain(&e))?;
                    return Ok(Tidied::Reverted);
                }
            }
        }
        self.settle_pending_step(record, step)
            .await
            .map(|()| Tidied::Done)
    }

    async fn settle_pending_step(
        &self,
        record: &MigrationRecord,
        step: &StepRecord,
    ) -> Result<(), String> {
        let vm = &record.vm;
        let chain = |e: &ferry_api::ClientError| ferry_api::error_chain(e);
        match step.name.as_str() {
            "prepare_destination" => {
                let dst = self
                    .agent(&record.destination)
                    .await
                    .map_err(|e| e.to_string())?;
                dst.incoming_abort(record.id).await.map_err(|e| chain(&e))
            }
            "start_outgoing" => {
                let src = self
                    .agent(&record.source)
                    .await
                    .map_err(|e| e.to_string())?;
                match src.outgoing_cancel(vm).await {
                    Ok(_) => Ok(()),
                    Err(error) => match src.get_vm(vm).await {
                        Ok(info) if info.state == ferry_api::VmState::Running => Ok(()),
                        _ => Err(chain(&error)),
                    },
                }
            }
            "finish_destination" => {
                let dst = self
                    .agent(&record.destination)
                    .await
                    .map_err(|e| e.to_string())?;
                match dst.get_vm(vm).await {
                    Ok(info) if info.state == ferry_api::VmState::Running => Ok(()),
                    _ => dst
                        .incoming_finish(record.id)
                        .await
                        .map(|_| ())
                        .map_err(|e| chain(&e)),
                }
            }
            "retire_source" => {
                let src = self
                    .agent(&record.source)
                    .await
                    .map_err(|e| e.to_string())?;
                let disks: Vec<String> = step
                    .detail
                    .get("remove_disks")
                    .and_then(|d| d.as_array())
                    .map(|d| {
                        d.iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_else(|| copied_disks(&record.steps));
                match src.outgoing_retire(vm, &disks).await {
                    Ok(()) => Ok(()),
                    Err(error) if is_gone(&error) => Ok(()),
                    Err(error) => Err(chain(&error)),
                }
            }
            other => Err(format!("no clean-up known for step {other}")),
        }
    }
}

/// What the janitor did about a pending step.
enum Tidied {
    Done,
    /// The destination was lost before the guest ran there: the commit
    /// was reverted, and every other pending step is void.
    Reverted,
}

/// A step an ended migration left to be finished later.
fn is_pending(step: &StepRecord) -> bool {
    step.state == StepState::Failed
        && step.detail.get("pending").and_then(|p| p.as_bool()) == Some(true)
}

/// The disks the saga recorded as copied (`prepare_destination`'s start).
fn copied_disks(steps: &[StepRecord]) -> Vec<String> {
    steps
        .iter()
        .find(|s| s.name == "prepare_destination")
        .and_then(|s| s.detail.get("copy_disks"))
        .and_then(|c| c.as_array())
        .map(|disks| {
            disks
                .iter()
                .filter_map(|d| d.get("disk_id").and_then(|id| id.as_str()))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// An answer that means "nothing of this migration here" (404, or the
/// agent's "no incoming migration" for an id it does not know).
fn is_gone(error: &ferry_api::ClientError) -> bool {
    error.is_not_found()
        || matches!(error, ferry_api::ClientError::Api { message, .. } if message.contains("no incoming migration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copied_disks_come_from_the_prepare_step() {
        let steps = vec![StepRecord {
            name: "prepare_destination".to_string(),
            state: StepState::Started,
            started_at: 0,
            finished_at: None,
            detail: serde_json::json!({"copy_disks": [
                {"disk_id": "vd0", "virtual_size_bytes": 1},
                {"disk_id": "vd1", "virtual_size_bytes": 2}
            ]}),
        }];
        assert_eq!(copied_disks(&steps), ["vd0", "vd1"]);
        assert!(copied_disks(&[]).is_empty());
    }
}
