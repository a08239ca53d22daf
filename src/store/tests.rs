//! Store-layer behaviour: visibility, chunking, uploads, expiry.

use std::io::Write;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::digest::{Encoding, Function};

fn open(dir: &Path) -> Arc<Store> {
    let options = StoreOptions { chunk_size: 64 << 10, ..StoreOptions::default() };
    Arc::new(Store::open(dir, options).unwrap())
}

fn bytes(len: usize, seed: u8) -> Bytes {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8).collect()
}

/// Sizes of the stored chunks (in RocksDB or in files), without upload
/// progress and counters.
fn chunk_values(store: &Store) -> Vec<u64> {
    chunk_refs(store).into_iter().map(|(len, _)| len).collect()
}

/// Sizes of the stored chunks, and whether each is in a file.
fn chunk_refs(store: &Store) -> Vec<(u64, bool)> {
    store
        .db
        .iterator_cf(store.cf(CF_CHUNKS), IteratorMode::Start)
        .map(Result::unwrap)
        .filter(|(k, _)| split_chunk_key(k).is_some_and(|(id, offset)| id != 0 && offset != PROGRESS_OFFSET))
        .map(|(_, v)| match chunk::file_ref_of(&v) {
            Some((_, len)) => (len as u64, true),
            None => (v.len() as u64, false),
        })
        .collect()
}

fn read_whole(store: &Store, d: &Digest) -> Vec<u8> {
    store.read_all(d).unwrap().expect("present").to_vec()
}

#[test]
fn put_blobs_verifies_and_reads_back_across_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let big = bytes(300_000, 1); // five chunks of 64 KiB
    let small = Bytes::from_static(b"small");
    let wrong = NewBlob::new(Digest::of(b"other"), Bytes::from_static(b"small"));
    let results = store.put_blobs(&[
        NewBlob::new(Digest::of(&big), big.clone()),
        wrong,
        NewBlob::new(Digest::of(&small), small.clone()),
    ]);
    assert!(matches!(results[0], Ok(Written::Stored)));
    assert!(matches!(results[1], Err(Error::DigestMismatch(_))));
    assert!(matches!(results[2], Ok(Written::Stored)));
    assert_eq!(store.contains(&[Digest::of(&big), Digest::of(b"other")]).unwrap(), vec![true, false]);
    assert_eq!(read_whole(&store, &Digest::of(&big)), big);
    // A read inside a chunk returns the rest of that chunk only.
    let blob = store.locate(&Digest::of(&big)).unwrap().unwrap();
    assert_eq!(store.read_at(&blob, 70_000).unwrap(), big.slice(70_000..131_072));
    assert!(store.read_at(&blob, 300_000).unwrap().is_empty());
    // Storing again is a no-op.
    assert!(matches!(
        store.put_blobs(&[NewBlob::new(Digest::of(&small), small)])[0],
        Ok(Written::AlreadyPresent)
    ));
}

#[test]
fn an_upload_is_invisible_until_finished_and_survives_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let data = bytes(200_000, 2);
    let digest = Digest::of(&data);
    {
        let store = open(tmp.path());
        let mut upload = store.begin_upload("u/1", digest, 0).unwrap();
        upload.append(&data[..100_000], None).unwrap();
        assert_eq!(store.contains(&[digest]).unwrap(), vec![false], "not visible while partial");
        assert!(matches!(store.begin_upload("u/1", digest, 0), Err(Error::UploadBusy(_))));
    }
    let store = open(tmp.path());
    assert_eq!(store.upload_committed("u/1").unwrap(), Some(100_000));
    assert!(matches!(store.begin_upload("u/1", digest, 5), Err(Error::BadOffset { committed: 100_000, .. })));
    let mut upload = store.begin_upload("u/1", digest, 100_000).unwrap();
    upload.append(&data[100_000..], None).unwrap();
    assert_eq!(upload.finish().unwrap(), Written::Stored);
    assert_eq!(read_whole(&store, &digest), data);
    assert_eq!(store.upload_committed("u/1").unwrap(), None);
}

#[test]
fn a_mismatched_upload_stores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let data = bytes(1000, 3);
    let mut upload = store.begin_upload("u/bad", Digest::of(b"not these bytes"), 0).unwrap();
    upload.append(&data, None).unwrap();
    assert!(matches!(upload.finish(), Err(Error::DigestMismatch(_))));
    assert_eq!(store.upload_committed("u/bad").unwrap(), None);
    assert!(store.locate(&Digest::of(&data)).unwrap().is_none());
}

#[test]
fn racing_uploads_of_one_blob_leave_one_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let data = bytes(150_000, 4);
    let digest = Digest::of(&data);
    let mut a = store.begin_upload("a", digest, 0).unwrap();
    let mut b = store.begin_upload("b", digest, 0).unwrap();
    a.append(&data, None).unwrap();
    b.append(&data, None).unwrap();
    assert_eq!(a.finish().unwrap(), Written::Stored);
    assert_eq!(b.finish().unwrap(), Written::AlreadyPresent);
    assert_eq!(read_whole(&store, &digest), data);
    // Only the winner's chunk remains (each append writes one chunk).
    assert_eq!(chunk_values(&store).len(), 1);
}

#[test]
fn blob_ids_are_not_reused_after_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let first = {
        let store = open(tmp.path());
        let mut upload = store.begin_upload("pending", Digest::of(b"x"), 0).unwrap();
        upload.append(b"partial", None).unwrap();
        store.next_blob_id.load(Ordering::Relaxed)
    };
    let store = open(tmp.path());
    assert!(store.next_blob_id.load(Ordering::Relaxed) >= first);
}

#[test]
fn expiry_spares_fresh_and_active_uploads() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let mut active = store.begin_upload("active", Digest::of(b"a"), 0).unwrap();
    active.append(b"a", None).unwrap();
    let mut idle = store.begin_upload("idle", Digest::of(b"b"), 0).unwrap();
    idle.append(b"b", None).unwrap();
    drop(idle);
    assert_eq!(store.expire_uploads(Duration::from_secs(3600)).unwrap(), 0, "all fresh");
    assert_eq!(store.expire_uploads(Duration::ZERO).unwrap(), 1, "only the idle one");
    assert_eq!(store.upload_committed("idle").unwrap(), None);
    assert_eq!(store.upload_committed("active").unwrap(), Some(1));
}

#[test]
fn access_times_are_flushed_for_present_blobs() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let data = Bytes::from_static(b"touch me");
    let d = Digest::of(&data);
    store.put_blobs(&[NewBlob::new(d, data)]);
    store.flush_access_times().unwrap();
    let mut entry = store.get_entry(&d).unwrap().unwrap();
    entry.atime = 1;
    store.db.put_cf(store.cf(CF_INDEX), index_key(&d), entry.encode()).unwrap();
    store.contains(&[d, Digest::of(b"absent")]).unwrap();
    assert_eq!(store.flush_access_times().unwrap(), 1);
    assert!(store.get_entry(&d).unwrap().unwrap().atime > 1);
}

#[test]
fn uses_within_the_resolution_are_not_written_yet_keep_what_they_used() {
    let tmp = tempfile::tempdir().unwrap();
    const HOUR: u64 = 3_600_000;
    let options = StoreOptions { use_resolution: Duration::from_millis(HOUR), ..StoreOptions::default() };
    let store = Store::open(tmp.path(), options).unwrap();
    let (old, new) = (put(&store, &bytes(1000, 1)), put(&store, &bytes(1000, 2)));
    let action = Digest::of(b"action");
    store.put_action_result("ci", &action, None, b"result").unwrap();
    // `old` was last used two hours ago, the others just now.
    let mut entry = store.get_entry(&old).unwrap().unwrap();
    let mut batch = WriteBatch::default();
    batch.delete_cf(store.cf(CF_LRU), lru_key(entry.atime, &old));
    entry.atime -= 2 * HOUR;
    batch.put_cf(store.cf(CF_LRU), lru_key(entry.atime, &old), []);
    batch.put_cf(store.cf(CF_INDEX), index_key(&old), entry.encode());
    store.db.write(batch).unwrap();
    let written = store.get_entry(&new).unwrap().unwrap().atime;

    store.contains(&[old, new]).unwrap();
    store.touch_action_result("ci", &action);
    assert_eq!(store.flush_access_times().unwrap(), 1, "only the use of the old blob is written");
    assert_eq!(store.get_entry(&new).unwrap().unwrap().atime, written);
    assert!(store.get_entry(&old).unwrap().unwrap().atime >= written);
    // The uses not written may have come after any cutoff up to now: all
    // three are kept until their written uses are an hour older than it.
    assert_eq!(store.evict_lru(u64::MAX, now_ms() + 1).unwrap(), Evicted::default());
    let evicted = store.evict_lru(u64::MAX, now_ms() + HOUR + 1).unwrap();
    assert_eq!((evicted.blobs, evicted.action_results), (2, 1), "{evicted:?}");
}

#[test]
fn a_flush_cut_short_keeps_the_rest_for_the_next() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let blobs: Vec<NewBlob> = (0..2000u32)
        .map(|i| {
            let data = Bytes::from(format!("blob {i}"));
            NewBlob::new(Digest::of(&data), data)
        })
        .collect();
    assert!(store.put_blobs(&blobs).iter().all(Result::is_ok));
    let digests: Vec<Digest> = blobs.iter().map(|b| b.digest).collect();
    let old = |d: &Digest| {
        let mut entry = store.get_entry(d).unwrap().unwrap();
        entry.atime = 1;
        store.db.put_cf(store.cf(CF_INDEX), index_key(d), entry.encode()).unwrap();
    };
    digests.iter().for_each(old);
    store.contains(&digests).unwrap();
    // Three stripes, then a stop.
    let stripes = std::cell::Cell::new(0);
    let flushed = store
        .flush_access_times_while(&|| {
            stripes.set(stripes.get() + 1);
            stripes.get() <= 3
        })
        .unwrap();
    assert!(flushed.updated > 0 && flushed.left > 0, "{flushed:?}");
    assert_eq!(flushed.updated + flushed.left, digests.len());
    // The next flush writes what was left; none is lost or written twice.
    assert_eq!(store.flush_access_times().unwrap(), flushed.left);
    assert!(digests.iter().all(|d| store.get_entry(d).unwrap().unwrap().atime > 1));
}

/// The allocated bytes of the blob files, as `du` counts them.
fn file_blocks(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for shard in std::fs::read_dir(dir.join(files::DIR)).unwrap() {
        for file in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            total += file.unwrap().metadata().unwrap().blocks() * 512;
        }
    }
    total
}

fn file_of(dir: &Path, blob_id: u64) -> PathBuf {
    dir.join(files::DIR).join(format!("{:02x}/{blob_id:016x}", blob_id % 256))
}

#[test]
fn a_resumed_upload_is_verified_over_every_byte_once_it_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    for (name, size) in [("small", 100_000), ("file", 900_000)] {
        let data = bytes(size, 6);
        let digest = Digest::of(&data);
        // The first stream sends a wrong byte; the streams that resume it
        // send the right ones: the blob is refused, and nothing is visible.
        let mut wrong = data.to_vec();
        wrong[10] ^= 1;
        let mut upload = store.begin_upload(name, digest, 0).unwrap();
        upload.append(&wrong[..size / 3], None).unwrap();
        drop(upload);
        for (from, to) in [(size / 3, size / 2), (size / 2, size)] {
            let mut upload = store.begin_upload(name, digest, from as u64).unwrap();
            upload.append(&data[from..to], None).unwrap();
            if to < size {
                continue;
            }
            let refused = upload.finish();
            assert!(matches!(refused, Err(Error::DigestMismatch(_))), "{name}: {refused:?}");
        }
        assert_eq!(store.contains(&[digest]).unwrap(), [false], "{name}");
        // Right bytes in three streams: stored.
        for (from, to) in [(0, size / 3), (size / 3, size / 2), (size / 2, size)] {
            let mut upload = store.begin_upload(name, digest, from as u64).unwrap();
            upload.append(&data[from..to], None).unwrap();
            if to == size {
                assert_eq!(upload.finish().unwrap(), Written::Stored, "{name}");
            }
        }
        assert_eq!(read_whole(&store, &digest), data, "{name}");
    }
}

#[test]
fn large_uploads_go_to_a_file_of_their_own_and_resume_past_a_torn_append() {
    let tmp = tempfile::tempdir().unwrap();
    let data = bytes(1_000_000, 5);
    let digest = Digest::of(&data);
    let blob_id;
    {
        let store = open(tmp.path());
        let mut upload = store.begin_upload("big", digest, 0).unwrap();
        for part in data[..600_000].chunks(64 << 10) {
            upload.append(part, None).unwrap();
        }
        blob_id = upload.record.blob_id;
        assert_eq!(store.files.bytes(), file_blocks(tmp.path()), "the blob file is counted as it grows");
    }
    // A crash after an append reached the file but before its reference
    // was written leaves bytes past the committed end.
    let path = file_of(tmp.path(), blob_id);
    let committed_len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(&[7; 5000]).unwrap();
    let store = open(tmp.path());
    assert_eq!(store.files.bytes(), file_blocks(tmp.path()), "counted at open");
    assert_eq!(store.upload_committed("big").unwrap(), Some(600_000));
    let mut upload = store.begin_upload("big", digest, 600_000).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), committed_len, "resuming cut the torn append");
    upload.append(&data[600_000..], None).unwrap();
    assert_eq!(upload.finish().unwrap(), Written::Stored);
    assert_eq!(read_whole(&store, &digest), data);
    assert_eq!(store.upload_committed("big").unwrap(), None);
    // RocksDB holds references only, and no progress.
    let refs = chunk_refs(&store);
    assert_eq!(refs.len(), 600_000usize.div_ceil(64 << 10) + 1);
    assert!(refs.iter().all(|(_, in_file)| *in_file), "{refs:?}");
    assert_eq!(store.files.bytes(), file_blocks(tmp.path()));
    // Evicting the blob deletes its file, and its bytes are no longer counted.
    store.evict_lru(u64::MAX, u64::MAX).unwrap();
    assert!(!path.exists());
    assert_eq!((store.files.bytes(), file_blocks(tmp.path())), (0, 0));
}

#[test]
fn batches_write_large_blobs_to_files_and_a_lost_file_is_a_missing_blob() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let large = Bytes::from(crate::testdata::random_bytes(300_000, 8));
    let small = bytes(30_000, 9);
    let (dl, ds) = (put(&store, &large), put(&store, &small));
    assert_eq!(read_whole(&store, &dl), large);
    assert_eq!(read_whole(&store, &ds), small);
    assert!(store.files.bytes() >= 300_000, "the large blob has a file");
    assert!(store.files.bytes() < 320_000, "the small one has none");
    // Stored again: no second file.
    assert!(matches!(store.put_blobs(&[NewBlob::new(dl, large.clone())])[0], Ok(Written::AlreadyPresent)));
    assert_eq!(store.files.bytes(), file_blocks(tmp.path()));
    // A file that went missing is a corrupt blob: removed, reported missing.
    let blob = store.locate(&dl).unwrap().unwrap();
    std::fs::remove_file(file_of(tmp.path(), blob.blob_id)).unwrap();
    assert!(matches!(store.read_at(&blob, 0), Err(Error::Removed(_))));
    assert_eq!(store.contains(&[dl, ds]).unwrap(), vec![false, true]);
}

#[test]
fn files_nothing_refers_to_are_removed_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    let kept = {
        let store = open(tmp.path());
        put(&store, &bytes(300_000, 3));
        store.locate(&Digest::of(&bytes(300_000, 3))).unwrap().unwrap().blob_id
    };
    // A crash between writing a file and its first reference.
    let orphan = file_of(tmp.path(), kept + 10);
    std::fs::write(&orphan, [1; 3000]).unwrap();
    let store = open(tmp.path());
    assert!(!orphan.exists());
    assert!(file_of(tmp.path(), kept).exists());
    assert_eq!(store.files.bytes(), file_blocks(tmp.path()));
    assert_eq!(read_whole(&store, &Digest::of(&bytes(300_000, 3))), bytes(300_000, 3));
}

#[test]
fn an_upload_reserves_its_size_at_the_start() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let data = bytes(500_000, 4);
    store.set_hard_limit(store.disk_estimate() + 700_000);
    let upload = store.begin_upload("first", Digest::of(&data), 0).unwrap();
    assert!(store.disk_estimate() >= 500_000 + store.written_estimate(), "reserved at once");
    // A second upload of the same size cannot reserve: refused before any
    // byte of it is written, and eviction is asked to make room for it.
    let other = bytes(500_000, 5);
    assert!(matches!(store.begin_upload("second", Digest::of(&other), 0), Err(Error::Full { .. })));
    assert!(store.disk_wanted() >= store.disk_estimate() + 500_000);
    // One that can never fit says so.
    let huge = Digest::new(Function::Sha256, &[1; 32], 1 << 40).unwrap();
    assert!(matches!(store.begin_upload("huge", huge, 0), Err(Error::TooLarge { .. })));
    drop(upload);
    assert!(store.begin_upload("second", Digest::of(&other), 0).is_ok(), "released when the first ended");
}

fn put(store: &Store, data: &Bytes) -> Digest {
    let d = Digest::of(data);
    assert!(store.put_blobs(&[NewBlob::new(d, data.clone())])[0].is_ok());
    d
}

#[test]
fn eviction_takes_the_least_recently_used_first() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let blobs: Vec<Bytes> = (0..10).map(|i| bytes(10_000, i)).collect();
    let mut digests = Vec::new();
    for b in &blobs {
        digests.push(put(&store, b));
        std::thread::sleep(Duration::from_millis(3)); // distinct write times
    }
    // Use the two oldest: they become the most recent.
    store.contains(&digests[..2]).unwrap();
    let before = store.stored_bytes().unwrap();
    let each = before / 10;
    let evicted = store.evict_lru(3 * each, now_ms() + 1).unwrap();
    assert_eq!(evicted.blobs, 3);
    let present = store.contains(&digests).unwrap();
    assert_eq!(present, [true, true, false, false, false, true, true, true, true, true]);
    assert_eq!(store.stored_bytes().unwrap(), before - evicted.bytes);
    // Nothing used after the cutoff is taken, however much is wanted.
    let evicted = store.evict_lru(u64::MAX, 0).unwrap();
    assert_eq!(evicted.blobs, 0);
}

#[test]
fn stored_bytes_are_counted_and_survive_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let counted = {
        let store = open(tmp.path());
        assert_eq!(store.stored_bytes().unwrap(), 0);
        put(&store, &bytes(200_000, 1));
        let text = Bytes::from("some text ".repeat(10_000));
        put(&store, &text);
        let mut upload = store.begin_upload("partial", Digest::of(b"x"), 0).unwrap();
        upload.append(&bytes(50_000, 2), None).unwrap();
        let counted = store.stored_bytes().unwrap();
        assert_eq!(counted, chunk_values(&store).iter().sum::<u64>(), "the counter is exact");
        counted
    };
    let store = open(tmp.path());
    assert_eq!(store.stored_bytes().unwrap(), counted);
    assert_eq!(store.expire_uploads(Duration::ZERO).unwrap(), 1);
    let evicted = store.evict_lru(u64::MAX, u64::MAX).unwrap();
    assert_eq!(evicted.blobs, 2);
    assert_eq!(store.stored_bytes().unwrap(), 0);
}

#[test]
fn writes_are_refused_at_the_hard_limit_and_reads_go_on() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let kept = put(&store, &bytes(1000, 1));
    store.set_hard_limit(store.disk_estimate() + 100_000);
    // Incompressible: stored at their size, and counted so.
    let random = |seed| Bytes::from(crate::testdata::random_bytes(60_000, seed));
    put(&store, &random(2));
    let refused = store.put_blobs(&[NewBlob::new(Digest::of(&random(3)), random(3))]);
    assert!(matches!(refused[0], Err(Error::Full { .. })), "{refused:?}");
    // An upload is refused at its start, before it sends a byte.
    let upload = store.begin_upload("u", Digest::of(&random(3)), 0);
    assert!(matches!(upload, Err(Error::Full { .. })));
    assert_eq!(read_whole(&store, &kept), bytes(1000, 1));
    store.set_hard_limit(u64::MAX);
    put(&store, &random(3));
}

#[test]
fn client_frames_are_kept_only_where_they_hold_exactly_one_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path()); // 64 KiB chunks
    let text: Bytes = crate::testdata::text_bytes(100_000, 1).into();
    let frame = |r: Range<usize>| Bytes::from(zstd::bulk::compress(&text[r], 19).unwrap());
    let first = frame(0..65_536);
    // Frames for the first chunk (kept), and one misaligned with the second.
    let blob = NewBlob {
        digest: Digest::of(&text),
        data: text.clone(),
        frames: vec![(0..65_536, first.clone()), (65_536..99_999, frame(65_536..99_999))],
        stored: None,
    };
    assert!(store.put_blobs(&[blob])[0].is_ok());
    let located = store.locate(&Digest::of(&text)).unwrap().unwrap();
    let (sent, len) = store.read_frame_at(&located, 0).unwrap();
    assert_eq!((sent, len), (first, 65_536), "the client's level-19 frame, as it was");
    let (second, len) = store.read_frame_at(&located, 65_536).unwrap();
    assert_eq!(len, 100_000 - 65_536);
    assert_eq!(zstd::stream::decode_all(&second[..]).unwrap(), &text[65_536..]);
    let (encoded, encoding) = store.read_all_encoded(&Digest::of(&text)).unwrap().unwrap();
    assert_eq!(encoding, Encoding::Zstd);
    assert_eq!(zstd::stream::decode_all(&encoded[..]).unwrap(), text);
}

#[test]
fn a_version_1_directory_keeps_its_action_results() {
    let tmp = tempfile::tempdir().unwrap();
    let action = Digest::of(b"action");
    {
        let store = open(tmp.path());
        // What version 1 wrote: the key ends in the whole index key.
        let mut key = b"inst\0".to_vec();
        key.extend_from_slice(&index_key(&action));
        store.db.put_cf(store.cf(CF_AC), key, [&[AC_VALUE_VERSION][..], b"result"].concat()).unwrap();
        store.db.put(LAYOUT_KEY, LAYOUT_VERSION_1).unwrap();
    }
    let store = open(tmp.path());
    assert_eq!(store.get_action_result("inst", &action).unwrap().unwrap().result, b"result".as_slice());
    assert_eq!(store.db.get(LAYOUT_KEY).unwrap().unwrap(), LAYOUT_VERSION);
    // And, upgraded through version 2, it is counted and can be evicted.
    assert_eq!(store.stored_bytes().unwrap(), 17 + 6);
    let evicted = store.evict_lru(u64::MAX, u64::MAX).unwrap();
    assert_eq!((evicted.action_results, evicted.bytes), (1, 17 + 6));
    assert_eq!(store.get_action_result("inst", &action).unwrap(), None);
    assert_eq!(store.stored_bytes().unwrap(), 0);
}

#[test]
fn a_version_4_directory_opens_as_it_is_and_takes_lists() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = bytes(300_000, 4);
    let d = Digest::of(&whole);
    {
        let store = open(tmp.path());
        put(&store, &whole);
        // What version 4 wrote: index entries of version 1, 25 bytes.
        let entry = store.get_entry(&d).unwrap().unwrap();
        let mut v1 = vec![1u8];
        for n in [entry.blob_id, entry.stored, entry.atime] {
            v1.extend_from_slice(&n.to_be_bytes());
        }
        store.db.put_cf(store.cf(CF_INDEX), index_key(&d), v1).unwrap();
        store.db.put(LAYOUT_KEY, LAYOUT_VERSION_4).unwrap();
    }
    let store = open(tmp.path());
    assert_eq!(store.db.get(LAYOUT_KEY).unwrap().unwrap(), LAYOUT_VERSION);
    assert_eq!(read_whole(&store, &d), whole);
    assert_eq!(entry_of(&store, &d).form, Form::Whole);
    let large = crate::testdata::random_bytes(5 << 20, 4);
    upload(&store, "new", &large, 1 << 20);
    assert_eq!(entry_of(&store, &Digest::of(&large)).form, Form::ListFastCdc);
    assert_eq!(
        store.evict_lru(u64::MAX, u64::MAX).unwrap().blobs,
        2 + Store::chunking().split(&large).len() as u64
    );
    assert_eq!(store.stored_bytes().unwrap(), 0);
}

#[test]
fn an_upgrade_cut_short_is_finished_at_the_next_open() {
    let tmp = tempfile::tempdir().unwrap();
    let action = Digest::of(b"action");
    {
        let store = open(tmp.path());
        let key = ac_key("inst", &action);
        store.db.put_cf(store.cf(CF_AC), key, [&[AC_VALUE_VERSION][..], b"result"].concat()).unwrap();
        store.db.put(LAYOUT_KEY, LAYOUT_UPGRADING_TO_3).unwrap();
    }
    let store = open(tmp.path());
    assert_eq!(store.db.get(LAYOUT_KEY).unwrap().unwrap(), LAYOUT_VERSION);
    assert_eq!(store.stored_bytes().unwrap(), 17 + 6, "timed and counted once");
    assert_eq!(store.evict_lru(u64::MAX, u64::MAX).unwrap().action_results, 1);
}

#[test]
fn action_results_live_inside_the_budget_and_are_evicted_with_blobs() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let result = bytes(100_000, 9);
    let actions: Vec<Digest> = (0..4u8).map(|i| Digest::of(&[i])).collect();
    let incompressible = |seed| Bytes::from(crate::testdata::random_bytes(50_000, seed));
    let old_blob = put(&store, &incompressible(1));
    for action in &actions {
        store.put_action_result("ci", action, Some(action.size), &result).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let new_blob = put(&store, &incompressible(2));
    let counted = store.stored_bytes().unwrap();
    assert!(counted > 4 * 100_000, "results are counted: {counted}");
    // Replacing a result counts it once.
    store.put_action_result("ci", &actions[3], None, &result).unwrap();
    assert_eq!(store.stored_bytes().unwrap(), counted);
    // A hit makes the first result the most recent of all.
    store.touch_action_result("ci", &actions[0]);
    store.flush_access_times().unwrap();
    // The oldest go first, blob or result: the old blob, then results 1 and 2.
    let evicted = store.evict_lru(50_000 + 2 * 100_000, now_ms() + 1).unwrap();
    assert_eq!((evicted.blobs, evicted.action_results), (1, 2), "{evicted:?}");
    let present = |a: &Digest| store.get_action_result("ci", a).unwrap().is_some();
    assert_eq!(actions.iter().map(present).collect::<Vec<_>>(), [true, false, false, true]);
    assert_eq!(store.contains(&[old_blob, new_blob]).unwrap(), [false, true]);
    assert_eq!(store.stored_bytes().unwrap(), counted - evicted.bytes);
    // At the hard limit, results are refused like blobs.
    store.set_hard_limit(store.disk_estimate() + 50_000);
    let refused = store.put_action_result("ci", &Digest::of(b"late"), None, &result);
    assert!(matches!(refused, Err(Error::Full { .. })), "{refused:?}");
    store.delete_action_result("ci", &actions[0]).unwrap();
    store.delete_action_result("ci", &actions[3]).unwrap();
    store.evict_lru(u64::MAX, u64::MAX).unwrap();
    assert_eq!(store.stored_bytes().unwrap(), 0, "deleted results are uncounted");
}

#[test]
fn raw_entries_are_apart_from_action_results_and_inside_the_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let key = Digest::of(b"a ccache entry's key");
    let (raw, result) = (bytes(30_000, 3), bytes(20_000, 4));
    store.put_raw_entry("ci", &key, &raw).unwrap();
    assert_eq!(store.get_action_result("ci", &key).unwrap(), None, "not an action result");
    store.put_action_result("ci", &key, None, &result).unwrap();
    assert_eq!(store.get_raw_entry("ci", &key).unwrap().as_deref(), Some(&raw[..]), "not replaced");
    assert_eq!(store.get_action_result("ci", &key).unwrap().unwrap().result, result);
    assert_eq!(store.get_raw_entry("other", &key).unwrap(), None, "instances are apart");
    let counted = store.stored_bytes().unwrap();
    assert!(counted > 50_000, "both are counted: {counted}");
    // A use moves a raw entry in the eviction order, as a hit does a result.
    std::thread::sleep(Duration::from_millis(2));
    store.touch_raw_entry("ci", &key);
    store.flush_access_times().unwrap();
    let evicted = store.evict_lru(1, now_ms() + 1).unwrap();
    assert_eq!(evicted.action_results, 1, "{evicted:?}");
    assert_eq!(store.get_action_result("ci", &key).unwrap(), None, "the older went first");
    assert!(store.get_raw_entry("ci", &key).unwrap().is_some());
    store.evict_lru(u64::MAX, u64::MAX).unwrap();
    assert_eq!(store.get_raw_entry("ci", &key).unwrap(), None);
    assert_eq!(store.stored_bytes().unwrap(), 0, "evicted entries are uncounted");
}

#[test]
fn blob_counters_follow_writes_and_evictions_and_survive_reopening() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (bytes(100_000, 1), bytes(5_000, 2));
    let remaining = {
        let store = open(tmp.path());
        let blobs = [NewBlob::new(Digest::of(&a), a.clone()), NewBlob::new(Digest::of(&b), b.clone())];
        assert!(store.put_blobs(&blobs).iter().all(Result::is_ok));
        let stats = store.stats().unwrap();
        assert_eq!((stats.blobs, stats.logical_bytes), (2, 105_000));
        assert_eq!(store.evict_lru(1, u64::MAX).unwrap().blobs, 1);
        let stats = store.stats().unwrap();
        assert_eq!((stats.blobs, stats.evicted_blobs), (1, 1));
        assert!([100_000, 5_000].contains(&stats.logical_bytes), "{}", stats.logical_bytes);
        stats.logical_bytes
    };
    let stats = open(tmp.path()).stats().unwrap();
    assert_eq!((stats.blobs, stats.logical_bytes), (1, remaining));
}

#[test]
fn directories_from_before_the_counters_are_counted_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let store = open(tmp.path());
        let data = bytes(70_000, 3);
        assert!(store.put_blobs(&[NewBlob::new(Digest::of(&data), data)])[0].is_ok());
        store.db.delete_cf(store.cf(CF_CHUNKS), BLOBS_KEY).unwrap();
        store.db.delete_cf(store.cf(CF_CHUNKS), LOGICAL_KEY).unwrap();
    }
    let stats = open(tmp.path()).stats().unwrap();
    assert_eq!((stats.blobs, stats.logical_bytes), (1, 70_000));
}

/// Flips a byte of the stored chunk of `d` at `offset`, under the store.
fn corrupt_chunk(store: &Store, d: &Digest, offset: u64) {
    let entry = store.get_entry(d).unwrap().unwrap();
    let key = chunk_key(entry.blob_id, offset);
    let mut value = store.db.get_cf(store.cf(CF_CHUNKS), key).unwrap().unwrap();
    value[10] ^= 0x40;
    store.db.put_cf(store.cf(CF_CHUNKS), key, value).unwrap();
}

#[test]
fn a_chunk_failing_its_checksum_is_never_served_and_its_blob_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let (bad, worse, good) = (bytes(100_000, 4), bytes(100_000, 5), bytes(100_000, 6));
    let blobs = [&bad, &worse, &good].map(|b| NewBlob::new(Digest::of(b), b.clone()));
    assert!(store.put_blobs(&blobs).iter().all(Result::is_ok));
    // Flip one byte of a chunk of `bad` and of `worse`, under the store.
    for data in [&bad, &worse] {
        corrupt_chunk(&store, &Digest::of(data), 65_536);
    }
    let blob = store.locate(&Digest::of(&bad)).unwrap().unwrap();
    assert_eq!(store.read_at(&blob, 0).unwrap(), bad.slice(..65_536), "the intact chunk reads");
    assert!(matches!(store.read_at(&blob, 70_000), Err(Error::Removed(_))));
    assert_eq!(store.contains(&[Digest::of(&bad)]).unwrap(), vec![false], "removed");
    // A scrub finds the other one, and keeps the good blob.
    let scrubbed = store.scrub(|_| true).unwrap();
    assert_eq!((scrubbed.blobs, scrubbed.removed), (2, 1));
    assert_eq!(store.contains(&[Digest::of(&worse), Digest::of(&good)]).unwrap(), vec![false, true]);
    let stats = store.stats().unwrap();
    assert_eq!((stats.corrupt_blobs, stats.blobs, stats.logical_bytes), (2, 1, 100_000));
}

/// Bytes of write-ahead log files in `dir`.
fn wal_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(Result::unwrap)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

#[test]
fn a_flushed_store_keeps_no_write_ahead_log_it_no_longer_needs() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    // Uploads smaller than a chunk go through the WAL; so do batches.
    for seed in 0..4 {
        let data = crate::testdata::random_bytes(60_000, seed);
        let digest = Digest::of(&data);
        let mut upload = store.begin_upload(&format!("uploads/{seed}"), digest, 0).unwrap();
        for part in data.chunks(64 << 10) {
            upload.append(part, None).unwrap();
        }
        upload.finish().unwrap();
    }
    let small = bytes(5_000, 9);
    store.put_blobs(&[NewBlob::new(Digest::of(&small), small)]);
    assert!(wal_bytes(tmp.path()) > 240_000, "the writes went through the WAL: {}", wal_bytes(tmp.path()));
    store.flush().unwrap();
    assert_eq!(wal_bytes(tmp.path()), 0, "no column family holds on to a WAL file");
}

/// A store as a server with an object store tier opens it.
fn open_queueing(dir: &Path, queue_limit: u64) -> Arc<Store> {
    let options = StoreOptions { chunk_size: 64 << 10, queue_limit, ..StoreOptions::default() };
    let store = Store::open(dir, options).unwrap();
    store.start_or_stop_queueing().unwrap();
    Arc::new(store)
}

fn queued_items(store: &Store) -> Vec<Queued> {
    store.queued(&[], 1000).unwrap().into_iter().map(|e| e.item).collect()
}

#[test]
fn writes_are_queued_with_their_blobs_and_copies_are_not() {
    let tmp = tempfile::tempdir().unwrap();
    let (batched, streamed, copied) = (bytes(1000, 1), bytes(200_000, 2), bytes(3000, 3));
    let action = Digest::of(b"action");
    {
        let store = open_queueing(tmp.path(), 1 << 20);
        let batched = put(&store, &batched);
        let mut upload = store.begin_upload("u", Digest::of(&streamed), 0).unwrap();
        upload.append(&streamed, None).unwrap();
        assert_eq!(upload.finish().unwrap(), Written::Stored);
        let mut copy = store.begin_copy("c", Digest::of(&copied)).unwrap();
        copy.append(&copied, None).unwrap();
        copy.finish().unwrap();
        store.put_action_result("ci", &action, None, b"result").unwrap();
        assert!(store.is_queued(&batched).unwrap());
        assert!(!store.is_queued(&Digest::of(&copied)).unwrap(), "a copy from the object store");
        assert_eq!(store.queue_len(), (3, 1000 + 200_000 + 6));
    }
    // The queue and its count survive reopening; blobs come before results.
    let store = open_queueing(tmp.path(), 1 << 20);
    assert_eq!(store.queue_len(), (3, 201_006));
    let items = queued_items(&store);
    assert_eq!(items.len(), 3);
    assert!(matches!(items[2], Queued::ActionResult { ref instance, .. } if instance == "ci"));
    // A listing resumes after a key.
    let first = store.queued(&[], 1).unwrap();
    assert_eq!(store.queued(&first[0].key, 10).unwrap().len(), 2);

    store.dequeue_vanished(&[Digest::of(&batched)]).unwrap();
    assert_eq!(store.queue_len().0, 3, "it is still there: it stays queued");
    store.dequeue_blobs(&[Digest::of(&batched), Digest::of(&batched)]).unwrap(); // counted once
    store.dequeue_blobs(&[Digest::of(&batched)]).unwrap();
    assert_eq!(store.queue_len(), (2, 200_006));
    // A result replaced since it was copied stays queued; the one copied goes.
    store.put_action_result("ci", &action, None, b"newer").unwrap();
    store.dequeue_action_result("ci", &action, Some(b"result")).unwrap();
    assert_eq!(store.queue_len(), (2, 200_005));
    store.dequeue_action_result("ci", &action, Some(b"newer")).unwrap();
    assert_eq!(store.queue_len(), (1, 200_000));
}

#[test]
fn copies_of_a_pack_keep_their_stored_chunk_and_are_not_queued() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_queueing(tmp.path(), 1 << 20);
    let (one, other) = (bytes(5000, 11), bytes(7000, 12));
    // As another node stored it: at a level this store would not use.
    let stored = Bytes::from(chunk::encode(&one, 19));
    let copies = [
        NewBlob { stored: Some(stored.clone()), ..NewBlob::new(Digest::of(&one), one.clone()) },
        NewBlob::new(Digest::of(&other), other.clone()),
    ];
    let written: Vec<Written> = store.put_copies(&copies).into_iter().map(Result::unwrap).collect();
    assert_eq!(written, [Written::Stored, Written::Stored]);
    assert_eq!(store.queue_len().0, 0, "copies from the object store are not queued");
    let located = store.locate(&Digest::of(&one)).unwrap().unwrap();
    let (start, value, held) = store.encoded_chunk_at(&located, 0).unwrap();
    assert_eq!((start, Bytes::from(value), held), (0, stored, 5000), "the chunk as it came");
    assert_eq!(read_whole(&store, &Digest::of(&one)), one);
    assert_eq!(read_whole(&store, &Digest::of(&other)), other);
    // A copy whose bytes are not its digest's is refused like any write.
    let liar = NewBlob::new(Digest::of(b"claimed"), Bytes::from_static(b"held"));
    assert!(matches!(store.put_copies(&[liar])[0], Err(Error::DigestMismatch(_))));
}

#[test]
fn blobs_written_again_are_queued_for_a_check_unless_queued_or_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_queueing(&tmp.path().join("q"), 250_000);
    let (copied, queued, absent) = (bytes(3000, 1), bytes(1000, 2), Digest::of(b"never stored"));
    let mut copy = store.begin_copy("c", Digest::of(&copied)).unwrap();
    copy.append(&copied, None).unwrap();
    copy.finish().unwrap();
    let queued = put(&store, &queued);
    let empty = Digest::of(b"");
    let digests = [Digest::of(&copied), Digest::of(&copied), queued, absent, empty];
    assert_eq!(store.recheck_blobs(&digests).unwrap(), 1, "only the unqueued copy");
    let entry =
        store.queued(&[], 10).unwrap().into_iter().find(|e| e.item == Queued::Blob(Digest::of(&copied)));
    assert!(entry.unwrap().check, "looked up before it is copied");
    assert_eq!(store.queue_len(), (2, 4000));
    // Best effort: a queue more than half full leaves them out (and counts
    // no refused write).
    store.dequeue_blobs(&[Digest::of(&copied)]).unwrap();
    put(&store, &bytes(124_000, 3));
    assert_eq!(store.recheck_blobs(&[Digest::of(&copied)]).unwrap(), 0);
    assert_eq!(store.queue_len(), (2, 125_000));
    assert_eq!(store.stats().unwrap().rejected_writes, 0);
    // Without a tier, nothing.
    let plain = open(&tmp.path().join("plain"));
    let d = put(&plain, &copied);
    assert_eq!(plain.recheck_blobs(&[d]).unwrap(), 0);
}

#[test]
fn a_full_queue_refuses_writes_and_nothing_without_a_tier_is_queued() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_queueing(&tmp.path().join("q"), 250_000);
    put(&store, &bytes(200_000, 1));
    let more = bytes(100_000, 2);
    let refused = store.put_blobs(&[NewBlob::new(Digest::of(&more), more.clone())]);
    assert!(matches!(refused[0], Err(Error::QueueFull { queued: 200_000, limit: 250_000 })), "{refused:?}");
    assert!(matches!(store.begin_upload("u", Digest::of(&more), 0), Err(Error::QueueFull { .. })));
    assert_eq!(store.contains(&[Digest::of(&more)]).unwrap(), vec![false]);
    // Once the queue drains, writes go in: even one larger than the queue.
    store.dequeue_blobs(&[Digest::of(&bytes(200_000, 1))]).unwrap();
    let larger = put(&store, &bytes(300_000, 3));
    assert!(matches!(
        store.put_blobs(&[NewBlob::new(Digest::of(&more), more.clone())])[0],
        Err(Error::QueueFull { .. })
    ));
    store.dequeue_blobs(&[larger]).unwrap();
    put(&store, &more);

    let plain = open(&tmp.path().join("plain"));
    let d = put(&plain, &more);
    plain.put_action_result("", &d, None, b"r").unwrap();
    assert!(!plain.is_queued(&d).unwrap());
    assert_eq!(plain.queue_len(), (0, 0));
}

#[test]
fn eviction_keeps_queued_blobs_and_a_corrupt_one_leaves_the_queue() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_queueing(tmp.path(), 1 << 20);
    let blobs: Vec<Bytes> = (0..4).map(|i| bytes(100_000, i)).collect();
    let mut digests = Vec::new();
    for b in &blobs {
        digests.push(put(&store, b));
        std::thread::sleep(Duration::from_millis(3));
    }
    // The two oldest were copied; the other two still wait.
    store.dequeue_blobs(&digests[..2]).unwrap();
    let evicted = store.evict_lru(u64::MAX, now_ms() + 1).unwrap();
    assert_eq!(evicted.blobs, 2);
    assert_eq!(store.contains(&digests).unwrap(), [false, false, true, true]);
    // Once copied, they may go too: their place in the eviction order was kept.
    store.dequeue_blobs(&digests[2..3]).unwrap();
    assert_eq!(store.evict_lru(u64::MAX, now_ms() + 1).unwrap().blobs, 1);

    // A queued blob found corrupt is removed, and with it its queue entry.
    corrupt_chunk(&store, &digests[3], 0);
    let blob = store.locate(&digests[3]).unwrap().unwrap();
    assert!(matches!(store.read_at(&blob, 0), Err(Error::Removed(_))));
    assert_eq!(store.queue_len(), (0, 0));
    assert!(queued_items(&store).is_empty());
}

#[test]
fn blobs_from_before_the_queue_are_backfilled_and_a_store_without_a_tier_keeps_no_queue() {
    let tmp = tempfile::tempdir().unwrap();
    let blobs: Vec<Bytes> = (0..5).map(|i| bytes(1000, i)).collect();
    let actions = [Digest::of(b"early action"), Digest::of(b"other early action")];
    {
        let store = open(tmp.path());
        for b in &blobs {
            put(&store, b);
        }
        store.put_action_result("ci", &actions[0], None, b"early").unwrap();
        store.put_action_result("", &actions[1], None, b"also early").unwrap();
    }
    {
        let store = open_queueing(tmp.path(), 1 << 20);
        assert_eq!(store.queue_len(), (0, 0));
        // A slice at a time, as room allows: blobs, then action results.
        assert_eq!(store.backfill(2500).unwrap(), Some(2));
        assert_eq!(store.backfill(1 << 20).unwrap(), Some(3));
        assert_eq!(store.backfill(6).unwrap(), Some(1));
        assert_eq!(store.backfill(1 << 20).unwrap(), Some(1));
        assert_eq!(store.backfill(1 << 20).unwrap(), None, "done");
        let entries = store.queued(&[], 10).unwrap();
        assert_eq!(entries.len(), 7);
        assert!(entries.iter().all(|e| e.check));
        let results: Vec<_> =
            entries.iter().filter(|e| matches!(e.item, Queued::ActionResult { .. })).collect();
        assert_eq!(results.len(), 2);
        assert_eq!(store.queue_len(), (7, 5000 + 5 + 10));
        // Once copied, a backfilled result leaves the queue like any other.
        store.dequeue_action_result("ci", &actions[0], Some(b"early")).unwrap();
        assert_eq!(store.queue_len(), (6, 5010));
        store.dequeue_action_result("", &actions[1], Some(b"also early")).unwrap();
        // A new write is queued as such, not as backfilled.
        let new = put(&store, &bytes(1000, 9));
        let new = store.queued(&[], 10).unwrap().into_iter().find(|e| e.item == Queued::Blob(new)).unwrap();
        assert!(!new.check);
    }
    // Reopened with the tier: no second backfill.
    let store = open_queueing(tmp.path(), 1 << 20);
    assert_eq!(store.backfill(1 << 20).unwrap(), None);
    assert_eq!(store.queue_len(), (6, 6000));
    drop(store);
    // Opened without the tier by something other than a server (`larder
    // scrub`), the queue stays.
    drop(open(tmp.path()));
    let store = open_queueing(tmp.path(), 1 << 20);
    assert_eq!(store.queue_len(), (6, 6000));
    drop(store);
    // A server without the tier: nothing waits (eviction may take every
    // blob); with it again, a new backfill.
    let store = open(tmp.path());
    store.start_or_stop_queueing().unwrap();
    assert!(store.queued(&[], 10).unwrap().is_empty());
    let evicted = store.evict_lru(u64::MAX, now_ms() + 1).unwrap();
    assert_eq!((evicted.blobs, evicted.action_results), (6, 2));
    put(&store, &bytes(1000, 1));
    store.put_action_result("ci", &actions[0], None, b"late").unwrap();
    store.put_action_result("", &actions[1], None, b"also late").unwrap();
    drop(store);
    let store = open_queueing(tmp.path(), 1 << 20);
    assert_eq!(store.queue_len(), (0, 0));
    assert_eq!(store.backfill(1 << 20).unwrap(), Some(1));
    assert_eq!(store.backfill(1 << 20).unwrap(), Some(2), "the action results, again");
    assert_eq!(store.backfill(1 << 20).unwrap(), None);
}

// Lists: large uploads cut into chunks stored once, splices, holds.

/// Uploads `data` in pieces of `piece` bytes, as a stream does.
fn upload(store: &Arc<Store>, name: &str, data: &[u8], piece: usize) -> Written {
    let mut up = store.begin_upload(name, Digest::of(data), 0).unwrap();
    for part in data.chunks(piece) {
        up.append(part, None).unwrap();
    }
    up.flush().unwrap();
    up.finish().unwrap()
}

/// `base` with `len` bytes changed at `at`, and `insert` new bytes after it.
fn edited(base: &[u8], at: usize, len: usize, insert: usize, seed: u64) -> Vec<u8> {
    let mut out = base[..at].to_vec();
    out.extend(crate::testdata::random_bytes(len + insert, seed));
    out.extend_from_slice(&base[at + len..]);
    out
}

fn entry_of(store: &Store, d: &Digest) -> IndexEntry {
    store.get_entry(d).unwrap().expect("present")
}

#[test]
fn large_uploads_are_cut_into_chunks_stored_once_and_read_at_any_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let v1 = crate::testdata::random_bytes(12 << 20, 1);
    let v2 = edited(&v1, 5 << 20, 1000, 3000, 2);
    assert_eq!(upload(&store, "v1", &v1, 1 << 20), Written::Stored);
    let one = store.stored_bytes().unwrap();
    assert!(one > 12 << 20, "random bytes do not compress: {one}");
    assert_eq!(upload(&store, "v2", &v2, 300_000), Written::Stored);
    let two = store.stored_bytes().unwrap() - one;
    assert!(two < 3 << 20, "the second version costs its changed chunks only: {two} bytes");
    for (data, d) in [(&v1, Digest::of(&v1)), (&v2, Digest::of(&v2))] {
        assert_eq!(entry_of(&store, &d).form, Form::ListFastCdc);
        assert_eq!(read_whole(&store, &d), *data);
        let blob = store.locate(&d).unwrap().unwrap();
        for offset in [0, 1, 131_071, 5 << 20, (5 << 20) + 999, data.len() as u64 - 1] {
            let part = store.read_at(&blob, offset).unwrap();
            assert!(!part.is_empty());
            assert_eq!(part, data[offset as usize..offset as usize + part.len()], "at {offset}");
            let (frame, held) = store.read_frame_at(&blob, offset).unwrap();
            assert_eq!(zstd::stream::decode_all(&frame[..]).unwrap(), part[..held as usize]);
        }
        // The list is what SplitBlob with the store's chunking cuts, every
        // chunk a blob of its own, held.
        let (form, chunks) = store.list_of(&d).unwrap().unwrap();
        assert_eq!(form, Form::ListFastCdc);
        let lengths: Vec<usize> = chunks.iter().map(|c| c.size as usize).collect();
        assert_eq!(lengths, Store::chunking().split(data));
        assert!(store.contains(&chunks).unwrap().iter().all(|p| *p));
        assert!(chunks.iter().all(|c| entry_of(&store, c).holders >= 1));
    }
    // Stored again: nothing more, and the upload's holds are released.
    let before = store.stored_bytes().unwrap();
    assert_eq!(upload(&store, "v1 again", &v1, 1 << 20), Written::AlreadyPresent);
    assert_eq!(store.stored_bytes().unwrap(), before);
    let (_, chunks) = store.list_of(&Digest::of(&v1)).unwrap().unwrap();
    let shared = chunks[0];
    assert_eq!(entry_of(&store, &shared).holders, 2, "held by v1 and v2 only");
}

#[test]
fn held_chunks_outlive_eviction_until_their_lists_go_and_counts_stay_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let small = put(&store, &bytes(10_000, 9));
    std::thread::sleep(Duration::from_millis(3));
    let v1 = crate::testdata::random_bytes(6 << 20, 3);
    let v2 = edited(&v1, 1 << 20, 10, 0, 4);
    upload(&store, "v1", &v1, 1 << 20);
    upload(&store, "v2", &v2, 1 << 20);
    let (d1, d2) = (Digest::of(&v1), Digest::of(&v2));
    let (_, c1) = store.list_of(&d1).unwrap().unwrap();
    // Every pass wants everything: only what is in the eviction order goes,
    // and a list is readable for as long as it is present.
    let mut passes = 0;
    while store.stored_bytes().unwrap() > 0 {
        let evicted = store.evict_lru(u64::MAX, now_ms() + 1000).unwrap();
        passes += 1;
        assert!(passes < 5, "eviction converges");
        assert!(evicted.blobs > 0);
        for (d, data) in [(&d1, &v1), (&d2, &v2)] {
            if store.contains(&[*d]).unwrap()[0] {
                assert_eq!(read_whole(&store, d), *data);
            }
        }
        if passes == 1 {
            // The lists' chunks went with them, in the same write.
            assert!(!store.contains(&[small, d1, d2]).unwrap().iter().any(|p| *p));
            assert!(!store.contains(&c1).unwrap().iter().any(|p| *p));
        }
    }
    assert_eq!(passes, 1);
    assert_eq!(store.stats().unwrap().blobs, 0);
    assert_eq!(store.stats().unwrap().logical_bytes, 0);
}

#[test]
fn a_spliced_blob_is_a_list_of_the_chunks_verified_first() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let data = Bytes::from(crate::testdata::random_bytes(5 << 20, 5));
    let parts: Vec<Bytes> = [0..1_000_000, 1_000_000..4_000_000, 4_000_000..data.len()]
        .into_iter()
        .map(|r| data.slice(r))
        .collect();
    let chunks: Vec<Digest> = parts.iter().map(|p| put(&store, p)).collect();
    let d = Digest::of(&data);
    let before = store.stored_bytes().unwrap();
    // Out of order: refused, nothing visible.
    let wrong = [chunks[1], chunks[0], chunks[2]];
    assert!(matches!(store.splice(&d, &wrong, Form::List, Chunks::Named), Err(Error::DigestMismatch(_))));
    assert!(!store.contains(&[d]).unwrap()[0]);
    let absent = Digest::of(b"not stored");
    assert_eq!(store.splice(&d, &[absent], Form::List, Chunks::Named).unwrap(), Spliced::Absent(absent));
    assert_eq!(store.splice(&chunks[0], &[chunks[0]], Form::List, Chunks::Named).unwrap(), Spliced::Small);
    assert_eq!(store.splice(&d, &chunks, Form::List, Chunks::Named).unwrap(), Spliced::Done(Written::Stored));
    assert!(store.stored_bytes().unwrap() - before < 1000, "a list costs its references only");
    assert_eq!(read_whole(&store, &d), data);
    let blob = store.locate(&d).unwrap().unwrap();
    assert_eq!(store.read_at(&blob, 3_999_999).unwrap(), data.slice(3_999_999..4_000_000));
    assert_eq!(
        store.splice(&d, &chunks, Form::List, Chunks::Named).unwrap(),
        Spliced::Done(Written::AlreadyPresent)
    );
    // A list of lists is not made.
    let twice = Bytes::from([&data[..], &data[..]].concat());
    assert_eq!(
        store.splice(&Digest::of(&twice), &[d, d], Form::List, Chunks::Named).unwrap(),
        Spliced::Nested(d)
    );
}

#[test]
fn a_split_whole_blob_becomes_a_list_and_gives_up_its_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let data = Bytes::from(crate::testdata::random_bytes(5 << 20, 6));
    let d = put(&store, &data);
    assert_eq!(entry_of(&store, &d).form, Form::Whole);
    let mut chunks = Vec::new();
    let mut at = 0;
    for len in Store::chunking().split(&data) {
        chunks.push(put(&store, &data.slice(at..at + len)));
        at += len;
    }
    let both = store.stored_bytes().unwrap();
    assert_eq!(
        store.splice(&d, &chunks, Form::ListFastCdc, Chunks::CutFromBlob).unwrap(),
        Spliced::Done(Written::Stored)
    );
    assert!(store.stored_bytes().unwrap() < both - (5 << 20) + 10_000, "the whole copy is freed");
    assert_eq!(store.list_of(&d).unwrap().unwrap(), (Form::ListFastCdc, chunks));
    assert_eq!(read_whole(&store, &d), data);
    assert_eq!(store.stats().unwrap().blobs as usize, 1 + store.list_of(&d).unwrap().unwrap().1.len());
}

#[test]
fn a_discarded_or_expired_cut_upload_releases_its_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let data = crate::testdata::random_bytes(8 << 20, 7);
    let d = Digest::of(&data);
    {
        let mut up = store.begin_upload("a", d, 0).unwrap();
        up.append(&data[..5 << 20], None).unwrap();
        up.flush().unwrap();
        assert_eq!(up.committed(), 5 << 20, "a flush commits every byte taken");
    }
    // Resumed in a second stream (cut as it began), then discarded.
    let mut up = store.begin_upload("a", d, 5 << 20).unwrap();
    up.append(&data[5 << 20..6 << 20], None).unwrap();
    up.flush().unwrap();
    up.discard().unwrap();
    drop(up);
    // Another left to expire.
    {
        let mut up = store.begin_upload("b", d, 0).unwrap();
        up.append(&data[..3 << 20], None).unwrap();
        up.flush().unwrap();
    }
    assert_eq!(store.expire_uploads(Duration::ZERO).unwrap(), 1);
    while store.evict_lru(u64::MAX, now_ms() + 1000).unwrap().blobs > 0 {}
    assert_eq!(store.stored_bytes().unwrap(), 0, "nothing is held any more");
    assert_eq!(store.stats().unwrap().blobs, 0);
}

#[test]
fn a_resumed_cut_upload_is_a_list_that_survives_reopening() {
    let tmp = tempfile::tempdir().unwrap();
    let data = crate::testdata::text_bytes(9 << 20, 8);
    let d = Digest::of(&data);
    {
        let store = open(tmp.path());
        let mut up = store.begin_upload("r", d, 0).unwrap();
        up.append(&data[..4_000_000], None).unwrap();
        up.flush().unwrap();
    }
    let store = open(tmp.path());
    let mut up = store.begin_upload("r", d, 4_000_000).unwrap();
    up.append(&data[4_000_000..], None).unwrap();
    up.flush().unwrap();
    assert_eq!(up.finish().unwrap(), Written::Stored);
    // Cut in two passes: a list, but not the one SplitBlob cuts.
    assert_eq!(entry_of(&store, &d).form, Form::List);
    drop(store);
    let store = open(tmp.path());
    assert_eq!(read_whole(&store, &d), data);
    assert_eq!(store.scrub(|_| true).unwrap().removed, 0);
}

#[test]
fn a_list_that_lost_a_chunk_is_never_served_and_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let data = crate::testdata::random_bytes(6 << 20, 9);
    let d = Digest::of(&data);
    upload(&store, "c", &data, 1 << 20);
    let (_, chunks) = store.list_of(&d).unwrap().unwrap();
    let chunk = store.locate(&chunks[1]).unwrap().unwrap();
    // A chunk found corrupt goes, held or not: its bytes are lost.
    assert!(matches!(store.remove_corrupt(&chunk, "test".into()), Error::Removed(_)));
    let blob = store.locate(&d).unwrap().unwrap();
    assert!(store.read_at(&blob, 0).is_ok(), "the first chunk is intact");
    assert!(matches!(store.read_at(&blob, chunks[0].size), Err(Error::Removed(_))));
    assert!(!store.contains(&[d]).unwrap()[0]);
    // Its other chunks are released, and go with the next evictions.
    while store.evict_lru(u64::MAX, now_ms() + 1000).unwrap().blobs > 0 {}
    assert_eq!(store.stored_bytes().unwrap(), 0);
}

#[test]
fn scrub_removes_a_list_whose_chunk_is_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let data = crate::testdata::random_bytes(6 << 20, 10);
    let d = Digest::of(&data);
    upload(&store, "s", &data, 1 << 20);
    assert_eq!(store.scrub(|_| true).unwrap().removed, 0);
    let (_, chunks) = store.list_of(&d).unwrap().unwrap();
    store.db.delete_cf(store.cf(CF_INDEX), index_key(&chunks[2])).unwrap();
    assert_eq!(store.scrub(|_| true).unwrap().removed, 1);
    assert!(!store.contains(&[d]).unwrap()[0]);
}

#[test]
fn eviction_takes_old_lists_until_the_chunks_they_release_cover_the_want() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let hot = crate::testdata::random_bytes(6 << 20, 11);
    upload(&store, "hot", &hot, 1 << 20);
    let mut version = crate::testdata::random_bytes(8 << 20, 12);
    let mut versions = Vec::new();
    for n in 0..12u64 {
        for (i, at) in [1usize, 3, 4, 6, 7].into_iter().enumerate() {
            version = edited(&version, at << 20, 64 << 10, 0, 100 * n + i as u64);
        }
        upload(&store, &format!("v{n}"), &version, 1 << 20);
        versions.push(Digest::of(&version));
    }
    std::thread::sleep(Duration::from_millis(3));
    store.locate(&Digest::of(&hot)).unwrap().unwrap();
    let before = store.stored_bytes().unwrap();
    // Each old version holds about 2.5 MiB that no later one shares: the
    // chunks a list was the last to hold go with it.
    let evicted = store.evict_lru(15 << 20, now_ms() + 1000).unwrap();
    let freed = before - store.stored_bytes().unwrap();
    let present = store.contains(&versions).unwrap();
    assert!(store.contains(&[Digest::of(&hot)]).unwrap()[0], "the blob used last stays");
    assert!(present[11] && !present[0], "{present:?}");
    assert!(present.iter().filter(|p| **p).count() >= 4, "{present:?}");
    assert!((15 << 20..25 << 20).contains(&freed), "{freed} bytes freed: {evicted:?}");
    for d in versions.iter().zip(&present).filter(|(_, p)| **p).map(|(d, _)| d) {
        let blob = store.locate(d).unwrap().unwrap();
        let mut offset = 0;
        while offset < d.size {
            offset += store.read_at(&blob, offset).unwrap().len() as u64;
        }
    }
}

#[test]
fn a_batch_read_answers_each_blob_as_a_read_alone_would() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path()); // 64 KiB chunks
    let text: Bytes = crate::testdata::text_bytes(30_000, 2).into();
    let raw = bytes(20_000, 7); // does not compress: stored raw
    let multi = bytes(150_000, 8); // three chunks
    let corrupt = bytes(10_000, 9);
    let blobs = [&text, &raw, &multi, &corrupt].map(|b| NewBlob::new(Digest::of(b), b.clone()));
    assert!(store.put_blobs(&blobs).iter().all(Result::is_ok));
    let entry = store.get_entry(&Digest::of(&corrupt)).unwrap().unwrap();
    let key = chunk_key(entry.blob_id, 0);
    let mut value = store.db.get_cf(store.cf(CF_CHUNKS), key).unwrap().unwrap();
    value[20] ^= 0x10;
    store.db.put_cf(store.cf(CF_CHUNKS), key, value).unwrap();
    let asked = [
        Digest::of(&text),
        Digest::of(b"absent"),
        Digest::empty(Function::Sha256),
        Digest::of(&raw),
        Digest::of(&multi),
        Digest::of(&corrupt),
    ];
    for zstd in [false, true] {
        let read = store.read_batch(&asked, zstd);
        for (i, data) in [(0, &text), (3, &raw), (4, &multi)] {
            let (got, encoding) = read[i].as_ref().unwrap().clone().unwrap();
            let plain = match encoding {
                Encoding::Identity => got.to_vec(),
                Encoding::Zstd => zstd::stream::decode_all(&got[..]).unwrap(),
            };
            assert_eq!(plain, data.to_vec(), "blob {i}, zstd {zstd}");
            let alone =
                if zstd { store.read_all_encoded(&asked[i]).unwrap().unwrap().1 } else { Encoding::Identity };
            assert_eq!(encoding, alone, "blob {i}: the encoding a read alone gives");
        }
        assert!(matches!(read[1], Ok(None)));
        assert_eq!(read[2].as_ref().unwrap().as_ref().unwrap().0.len(), 0);
        // A chunk failing its check is never served, and its blob goes.
        assert!(matches!(read[5], Err(Error::Removed(_)) | Ok(None)), "{:?}", read[5]);
    }
    assert_eq!(store.contains(&[Digest::of(&corrupt)]).unwrap(), vec![false]);
    assert_eq!(
        store.read_batch(&[Digest::of(&text)], true)[0].as_ref().unwrap().as_ref().unwrap().1,
        Encoding::Zstd
    );
}

#[test]
fn bytes_read_stay_whole_while_the_cache_turns_over_and_after_the_store_closes() {
    let tmp = tempfile::tempdir().unwrap();
    // A block cache of 64 KiB, so that reads after the first push its
    // blocks out while replies still hold them.
    let options = StoreOptions { zstd_level: 0, cache_size: 64 << 10, ..StoreOptions::default() };
    let store = Store::open(tmp.path(), options.clone()).unwrap();
    // Values in SST blocks (under 4 KiB) and in RocksDB's blob files.
    let blobs: Vec<Bytes> = (0..400).map(|i| bytes(100 + (i % 40) * 250, i as u8)).collect();
    let digests: Vec<Digest> = blobs.iter().map(|b| put(&store, b)).collect();
    store.flush().unwrap();
    let mut held = Vec::new();
    for (digests, blobs) in digests.chunks(20).zip(blobs.chunks(20)) {
        let read = store.read_batch(digests, false);
        for (read, blob) in read.into_iter().zip(blobs) {
            held.push((read.unwrap().unwrap().0, blob.clone()));
        }
    }
    for (d, blob) in digests.iter().zip(&blobs).step_by(7) {
        let located = store.locate(d).unwrap().unwrap();
        held.push((store.read_at(&located, 0).unwrap(), blob.clone()));
    }
    drop(store);
    for (got, blob) in &held {
        assert_eq!(got, blob);
    }
    // The replies gone, the database is closed: the directory opens again.
    drop(held);
    let store = Store::open(tmp.path(), options).unwrap();
    assert_eq!(read_whole(&store, &digests[399]), blobs[399]);
}

// The in-memory set of present blobs.

/// Every digest of `ds` is in the set exactly when the index holds it, and
/// under the index's blob id.
fn set_follows_index(store: &Store, ds: &[Digest]) {
    for d in ds {
        let indexed = store.get_entry(d).unwrap().map(|entry| entry.blob_id);
        assert_eq!(store.present.lookup(d), Some(indexed.is_some()), "{d}: indexed {indexed:?}");
        assert_eq!(store.present.blob_id(d), indexed, "{d}");
    }
}

#[test]
fn the_set_of_present_blobs_follows_every_write_and_delete_and_is_refilled_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    // Batches, a cut upload (its chunks stored one by one) and a splice.
    let small: Vec<Digest> = (0..20).map(|i| put(&store, &bytes(10_000, i))).collect();
    let big = crate::testdata::random_bytes(6 << 20, 7);
    upload(&store, "big", &big, 1 << 20);
    let (_, chunks) = store.list_of(&Digest::of(&big)).unwrap().unwrap();
    let parts = Bytes::from(crate::testdata::random_bytes(3 << 20, 8));
    let pieces = [parts.slice(..1 << 20), parts.slice(1 << 20..)].map(|p| put(&store, &p));
    let spliced = Digest::of(&parts);
    assert_eq!(
        store.splice(&spliced, &pieces, Form::List, Chunks::Named).unwrap(),
        Spliced::Done(Written::Stored)
    );
    let never = Digest::of(b"never stored");
    let mut all: Vec<Digest> = small.iter().chain(&chunks).chain(&pieces).copied().collect();
    all.extend([Digest::of(&big), spliced, never]);
    set_follows_index(&store, &all);
    assert_eq!(store.present.len(), (all.len() - 1, true));
    // A blob the set lost (a delete whose write failed) is entered again
    // when a client, told it is missing, uploads it.
    for d in [small[0], Digest::of(&big)] {
        store.present.remove(&d);
        assert_eq!(store.contains(&[d]).unwrap(), [false]);
    }
    let again = store.put_blobs(&[NewBlob::new(small[0], bytes(10_000, 0))]);
    assert!(matches!(again[0], Ok(Written::AlreadyPresent)));
    assert_eq!(upload(&store, "big again", &big, 1 << 20), Written::AlreadyPresent);
    set_follows_index(&store, &all);
    // A corrupt blob removed, then eviction of the oldest.
    corrupt_chunk(&store, &small[19], 0);
    let blob = store.locate(&small[19]).unwrap().unwrap();
    assert!(matches!(store.read_at(&blob, 0), Err(Error::Removed(_))));
    let evicted = store.evict_lru(2 * 10_000, now_ms() + 1).unwrap();
    assert!(evicted.blobs >= 1, "{evicted:?}");
    set_follows_index(&store, &all);
    assert!(!store.contains(&[small[19]]).unwrap()[0], "removed as corrupt");
    let left: Vec<bool> = all.iter().map(|d| store.get_entry(d).unwrap().is_some()).collect();
    assert!(left.iter().filter(|p| **p).count() > 3, "{left:?}");
    drop(store);
    // Refilled from the index at open...
    let store = open(tmp.path());
    set_follows_index(&store, &all);
    assert_eq!(store.contains(&all).unwrap(), left);
    drop(store);
    // ...up to its bound: past it, the index answers what the set cannot.
    let options = StoreOptions {
        chunk_size: 64 << 10,
        index_memory: 3 * present::BYTES_PER_BLOB as u64,
        ..StoreOptions::default()
    };
    let store = Store::open(tmp.path(), options).unwrap();
    assert_eq!(store.present.len(), (3, false));
    assert_eq!(store.present.lookup(&never), None);
    assert_eq!(store.contains(&all).unwrap(), left);
    drop(store);
    // An index entry that does not decode is present all the same, with no
    // blob id to read it by.
    let store = open(tmp.path());
    let kept = *all.iter().zip(&left).find(|(_, kept)| **kept).unwrap().0;
    store.db.put_cf(store.cf(CF_INDEX), index_key(&kept), b"garbled").unwrap();
    drop(store);
    let store = open(tmp.path());
    assert_eq!((store.present.lookup(&kept), store.present.blob_id(&kept)), (Some(true), None));
}
