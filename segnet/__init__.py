"""segnet: fully convolutional networks for KITTI road segmentation."""
