// Crop-and-resize for FFCV decoders, called from numba through ctypes (as FFCV calls its own libffcv).
// FFCV 1.0.2's resize is hard-wired to OpenCV's INTER_AREA, which costs ~0.6-1 ms an image for the ratios of a
// random-resized crop; below 2x either way bilinear reads every source pixel's neighbourhood (nothing to
// average away) at ~1/8 of the cost. At 2x and beyond, INTER_AREA as before.
#include <cstdint>
#include <opencv2/imgproc.hpp>

extern "C" {
void autowu_resize_crop(int64_t source_p, int64_t source_h, int64_t source_w, int64_t top, int64_t bottom,
                        int64_t left, int64_t right, int64_t dest_p, int64_t dest_h, int64_t dest_w) {
    cv::Mat source(source_h, source_w, CV_8UC3, (uint8_t *)source_p);
    cv::Mat dest(dest_h, dest_w, CV_8UC3, (uint8_t *)dest_p);
    bool small_ratio = (bottom - top) < 2 * dest_h && (right - left) < 2 * dest_w;
    cv::resize(source.colRange(left, right).rowRange(top, bottom), dest, dest.size(), 0, 0,
               small_ratio ? cv::INTER_LINEAR : cv::INTER_AREA);
}
}
