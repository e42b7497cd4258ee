"""Static DICOMweb trees (issue 18): the files a plain web server serves as read-only DICOMweb."""
