//! Upgrades of data directories written by older larders, run at open.

use rocksdb::{ColumnFamily, DB, IteratorMode, WriteBatch};

use super::layout::*;
use super::{Error, now_ms};

/// Re-keys the action cache of a layout version 1 directory (its keys ended
/// in the action's size), in batches; a crash midway is finished on the next
/// open, since re-keyed keys are told apart from old ones.
pub(super) fn upgrade_from_v1(db: &DB) -> Result<(), Error> {
    let cf = cf_handle(db, CF_AC);
    let mut batch = WriteBatch::default();
    let mut moved = 0usize;
    for item in db.iterator_cf(cf, IteratorMode::Start) {
        let (key, value) = item?;
        if let Some(new_key) = ac_key_from_v1(&key) {
            batch.delete_cf(cf, &key);
            batch.put_cf(cf, new_key, value);
            moved += 1;
        }
        if batch.len() >= 10_000 {
            db.write(std::mem::take(&mut batch))?;
        }
    }
    batch.put(LAYOUT_KEY, LAYOUT_VERSION_2);
    db.write(batch)?;
    tracing::info!("upgraded the data directory to layout version 2 ({moved} action cache keys)");
    Ok(())
}

/// Times every action result of a layout version 2 directory as used now,
/// gives it a place in the eviction order, and counts it in the stored
/// bytes, in batches; a crash midway is finished on the next open, since
/// timed values are told apart from old ones.
pub(super) fn upgrade_from_v2(db: &DB) -> Result<(), Error> {
    db.put(LAYOUT_KEY, LAYOUT_UPGRADING_TO_3)?;
    let (ac, lru, chunks) = (cf_handle(db, CF_AC), cf_handle(db, CF_LRU), cf_handle(db, CF_CHUNKS));
    let now = now_ms();
    let mut batch = WriteBatch::default();
    let mut timed = 0usize;
    let mut counted = 0i64;
    for item in db.iterator_cf(ac, IteratorMode::Start) {
        let (key, value) = item?;
        let Some(old @ AcValue { atime: None, .. }) = AcValue::decode(&value) else {
            continue;
        };
        let value = AcValue { atime: Some(now), ..old }.encode();
        batch.put_cf(lru, lru_action_key(now, &key), []);
        counted += value.len() as i64;
        batch.put_cf(ac, &key, value);
        timed += 1;
        if batch.len() >= 10_000 {
            batch.merge_cf(chunks, USAGE_KEY, usage_delta(std::mem::take(&mut counted)));
            db.write(std::mem::take(&mut batch))?;
        }
    }
    batch.merge_cf(chunks, USAGE_KEY, usage_delta(counted));
    batch.put(LAYOUT_KEY, LAYOUT_VERSION);
    db.write(batch)?;
    tracing::info!(
        "upgraded the data directory to layout version 3 ({timed} action results timed for eviction)"
    );
    Ok(())
}

fn cf_handle<'a>(db: &'a DB, name: &str) -> &'a ColumnFamily {
    db.cf_handle(name).expect("column families are created at open")
}
