//! The CUDA side of loramux: the kernels of cuda/*.cu, compiled by NVRTC at first use per device
//! (nvrtc.rs) and launched on the caller's stream (launch.rs). The driver is opened at run time
//! (cudarc dynamic loading); nothing CUDA is needed to build or to run the CPU paths.

pub mod launch;
pub mod nvrtc;
pub mod plan;

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result as drv, sys};

use crate::error::{LoraError, Result};

fn cuda_err(what: &str) -> impl Fn(drv::DriverError) -> LoraError + '_ {
    move |e| {
        let name = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        LoraError::Cuda(format!("{what}: {e:?} {name}"))
    }
}

/// The loaded kernels of one device, in its primary context (the one torch uses).
pub struct DeviceKernels {
    pub ordinal: i32,
    /// compute capability as 10 * major + minor, e.g. 90
    pub arch: u32,
    ctx: sys::CUcontext,
    functions: HashMap<&'static str, sys::CUfunction>,
}

// The handles are plain driver handles, valid from any thread once the context is current
// (`bind` makes it so before every launch).
unsafe impl Send for DeviceKernels {}
unsafe impl Sync for DeviceKernels {}

impl DeviceKernels {
    /// Makes this device's primary context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        unsafe { drv::ctx::set_current(self.ctx) }.map_err(cuda_err("cuCtxSetCurrent"))
    }

    pub fn function(&self, name: &str) -> Result<sys::CUfunction> {
        self.functions.get(name).copied().ok_or_else(|| LoraError::Cuda(format!("no kernel named {name}")))
    }

    fn load(ordinal: i32) -> Result<DeviceKernels> {
        let driver_ok = std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
        if !driver_ok {
            return Err(LoraError::Cuda("the CUDA driver (libcuda.so) is not installed".into()));
        }
        drv::init().map_err(cuda_err("cuInit"))?;
        let dev = drv::device::get(ordinal).map_err(cuda_err("cuDeviceGet"))?;
        let attr = |a| unsafe { drv::device::get_attribute(dev, a) }.map_err(cuda_err("cuDeviceGetAttribute"));
        let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        if major < 8 {
            return Err(LoraError::Cuda(format!(
                "device {ordinal} has compute capability {major}.{minor}; the kernels need 8.0+ (bf16 mma)"
            )));
        }
        let arch = (major * 10 + minor) as u32;
        // Retained for the life of the process, as torch does: the primary context is shared.
        let ctx = unsafe { drv::primary_ctx::retain(dev) }.map_err(cuda_err("cuDevicePrimaryCtxRetain"))?;
        unsafe { drv::ctx::set_current(ctx) }.map_err(cuda_err("cuCtxSetCurrent"))?;
        let mut functions = HashMap::new();
        for family in nvrtc::FAMILIES {
            let mut image = nvrtc::cubin(family, arch)?;
            image.push(0);
            let module = unsafe { drv::module::load_data(image.as_ptr() as *const _) }
                .map_err(cuda_err("cuModuleLoadData"))?;
            for &name in family.functions {
                let f = unsafe { drv::module::get_function(module, CString::new(name).unwrap()) }
                    .map_err(cuda_err("cuModuleGetFunction"))?;
                functions.insert(name, f);
            }
        }
        Ok(DeviceKernels { ordinal, arch, ctx, functions })
    }
}

static LOADED: OnceLock<Mutex<HashMap<i32, Arc<DeviceKernels>>>> = OnceLock::new();

/// The kernels of device `ordinal`, compiled and loaded at the first call; bound to this thread.
pub fn kernels(ordinal: i32) -> Result<Arc<DeviceKernels>> {
    let map = LOADED.get_or_init(|| Mutex::new(HashMap::new()));
    let k = {
        let mut guard = map.lock().map_err(|_| LoraError::Cuda("kernel registry poisoned".into()))?;
        match guard.get(&ordinal) {
            Some(k) => k.clone(),
            None => {
                let k = Arc::new(DeviceKernels::load(ordinal)?);
                guard.insert(ordinal, k.clone());
                k
            }
        }
    };
    k.bind()?;
    Ok(k)
}
