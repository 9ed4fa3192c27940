//! Putting an adapter into the host tier: checked, digested and packed into the host pool (in its
//! staging reserve, or in place once room is made), then made room for by LRU eviction.

use crate::cache::adapter_image::ImageLayout;
use crate::cache::host_tier::HostEntry;
use crate::cache::two_level::{PutOutcome, State, TwoLevelCache};
use crate::error::{LoraError, Result};
use crate::format::{self, ConfigRow, WeightsView};
use crate::fused_rows::split_fused_rows;

impl TwoLevelCache {
    /// Caches `task_id`'s adapter: validated and packed once into the serving dtype. The same
    /// weights again are a no-op; different weights need `replace`.
    pub fn put(&self, task_id: u64, weights: &WeightsView, config: &[ConfigRow], replace: bool) -> Result<PutOutcome> {
        let layout = format::checked_layout(weights, config, &self.cfg.spec, self.cfg.validate)?;
        let split = match &self.cfg.served {
            Some(served) => served.check(&layout)?,
            None => Vec::new(),
        };
        if split.is_empty() {
            return self.put_layout(task_id, weights, &layout, replace);
        }
        // Fused rows the model applies as their parts are cached as those parts. Their values are
        // checked as given first, so an error names the caller's row and column.
        format::scan_digest_pack(weights, &layout, self.cfg.validate.value_checks(Some(self.cfg.dtype)), None, false)?;
        let parts = split_fused_rows(weights, &layout, &split, &self.cfg.spec);
        self.put_layout(task_id, &parts.view(), &parts.layout, replace)
    }

    /// `put` of weights whose config is checked (`layout`) and whose rows the model applies.
    fn put_layout(&self, task_id: u64, weights: &WeightsView, layout: &format::AdapterLayout, replace: bool) -> Result<PutOutcome> {
        let checks = self.cfg.validate.value_checks(Some(self.cfg.dtype));
        let image_layout = ImageLayout::new(layout, self.cfg.dtype, self.cfg.page_bytes);
        if let Err(too_large) = self.fits_the_tiers(task_id, &image_layout) {
            // Bad values are named before size, as when every value check ran first.
            format::scan_digest_pack(weights, layout, checks, None, false)?;
            return Err(too_large);
        }
        if self.contains(task_id) {
            // Perhaps the same weights again: check and digest them before packing anything.
            let digest = format::scan_digest_pack(weights, layout, checks, None, true)?;
            if let Some(outcome) = self.existing_put(task_id, digest, replace)? {
                return Ok(outcome);
            }
        }
        // The image lands in the pool's memory, mapped (and pinned) when the cache was built:
        // fresh host memory costs page faults and page locking, far more than packing itself.
        let len = image_layout.held_bytes();
        let unused_budget = self.cfg.host_budget_bytes - self.state.read().host.used_bytes();
        let Some(mut image) = self.pool.try_stage(len, unused_budget) else {
            return self.put_in_place(task_id, weights, layout, &image_layout, replace);
        };
        // Check, digest and pack in one pass on every core, without the lock: other threads keep
        // serving meanwhile. A refused put gives its pages straight back (dropping `image`).
        let digest = image_layout.check_and_pack(weights, layout, checks, image.as_mut_slice())?;

        let mut st = self.state.write();
        let settled = Self::existing_put_locked(&mut st, task_id, digest, replace);
        if !matches!(settled, Ok(None)) {
            return settled.map(Option::unwrap); // another thread put it meanwhile
        }
        let replacing = st.host.contains(task_id).then_some(task_id);
        let victims = st.host.plan_room(len as u64, replacing, |id| st.pins.contains_key(&id))?;
        let dropped = Self::evict_for_put(&mut st, &victims, replacing)?;
        image.unstage();
        st.host.insert(task_id, HostEntry { image, layout: image_layout, digest, loaded: false });
        let outcome = Self::count_put(&mut st, replacing);
        drop(dropped); // their pages go back to the pool for the next puts
        drop(st);
        self.pool.trim();
        Ok(outcome)
    }

    /// A put with no staging room (its image is larger than the reserve, or free pool space is
    /// split into holes): check and digest first, then, under the lock, evict, close holes and
    /// pack into the room made. Two passes over the weights instead of one, and other threads
    /// wait for the packing, but no memory is allocated and a refused put still changes nothing.
    fn put_in_place(&self, task_id: u64, weights: &WeightsView, layout: &format::AdapterLayout, image_layout: &ImageLayout, replace: bool) -> Result<PutOutcome> {
        let checks = self.cfg.validate.value_checks(Some(self.cfg.dtype));
        let digest = format::scan_digest_pack(weights, layout, checks, None, true)?;
        let len = image_layout.held_bytes();
        let mut st = self.state.write();
        if let Some(outcome) = Self::existing_put_locked(&mut st, task_id, digest, replace)? {
            return Ok(outcome);
        }
        let replacing = st.host.contains(task_id).then_some(task_id);
        let victims = st.host.plan_room(len as u64, replacing, |id| st.pins.contains_key(&id))?;
        // Images may move below: no copy may be reading any of them (before anything changes).
        st.copier.wait_idle()?;
        let dropped = Self::evict_for_put(&mut st, &victims, replacing)?;
        drop(dropped);
        let mut image = match self.pool.try_alloc(len) {
            Some(image) => image,
            None => {
                // The evictions left room enough (the staging reserve bounds what other puts
                // hold), split into holes: move the cached images together. Only images other
                // puts are staging now can keep a hole open; then the pool grows.
                st.counters.host_compactions += 1;
                self.pool.compact(st.host.images_mut());
                match self.pool.try_alloc(len) {
                    Some(image) => image,
                    None => self.pool.alloc(len)?, // the victims are gone; the tier stays consistent
                }
            }
        };
        image_layout.pack(weights, layout, image.as_mut_slice());
        st.host.insert(task_id, HostEntry { image, layout: image_layout.clone(), digest, loaded: false });
        let outcome = Self::count_put(&mut st, replacing);
        drop(st);
        self.pool.trim();
        Ok(outcome)
    }

    fn count_put(st: &mut State, replacing: Option<u64>) -> PutOutcome {
        if replacing.is_some() {
            st.counters.replacements += 1;
            PutOutcome::Replaced
        } else {
            st.counters.puts += 1;
            PutOutcome::Inserted
        }
    }

    /// Takes a put's victims (and the entry it replaces) out of both tiers; their images are
    /// returned for the caller to drop once copies from them are known to be done.
    fn evict_for_put(st: &mut State, victims: &[u64], replacing: Option<u64>) -> Result<Vec<HostEntry>> {
        let mut wait = false;
        let mut dropped = Vec::with_capacity(victims.len() + 1);
        for &id in victims.iter().chain(replacing.iter()) {
            let entry = st.host.remove(id).unwrap();
            wait |= entry.loaded;
            if let Some(r) = st.device.evict(id) {
                st.forget_resident(id, r.slot);
            }
            dropped.push(entry);
        }
        st.counters.host_evictions += victims.len() as u64;
        if wait {
            // Copies from the dropped images must finish before their memory is reused; if the
            // device cannot say, leak them rather than free memory a DMA may still read.
            if let Err(e) = st.copier.wait_idle() {
                std::mem::forget(dropped);
                return Err(e);
            }
        }
        Ok(dropped)
    }

    /// AdapterTooLarge when the image is larger than the whole host tier or device pool.
    fn fits_the_tiers(&self, task_id: u64, image_layout: &ImageLayout) -> Result<()> {
        let held = image_layout.held_bytes() as u64;
        if held > self.cfg.host_budget_bytes {
            return Err(LoraError::AdapterTooLarge { task_id, needed: held, tier: "host", capacity: self.cfg.host_budget_bytes });
        }
        let device_pages = self.state.read().device.pages().total_pages();
        if image_layout.total_pages() > device_pages {
            let capacity = (device_pages * self.cfg.page_bytes) as u64;
            return Err(LoraError::AdapterTooLarge { task_id, needed: held, tier: "device", capacity });
        }
        Ok(())
    }

    fn existing_put(&self, task_id: u64, digest: u64, replace: bool) -> Result<Option<PutOutcome>> {
        let st = self.state.upgradable_read();
        match st.host.peek(task_id) {
            None => Ok(None),
            Some(_) => Self::existing_put_locked(&mut parking_lot::RwLockUpgradableReadGuard::upgrade(st), task_id, digest, replace),
        }
    }

    /// Some(outcome) when the put is settled by what is cached already.
    fn existing_put_locked(st: &mut State, task_id: u64, digest: u64, replace: bool) -> Result<Option<PutOutcome>> {
        let Some(entry) = st.host.peek(task_id) else { return Ok(None) };
        if entry.digest == digest {
            st.host.touch(task_id);
            st.counters.put_hits += 1;
            return Ok(Some(PutOutcome::AlreadyCached));
        }
        if !replace {
            return Err(LoraError::TaskConflict { task_id });
        }
        if st.pins.contains_key(&task_id) {
            return Err(LoraError::TaskInUse { task_id, action: "replacing its weights" });
        }
        Ok(None)
    }
}
